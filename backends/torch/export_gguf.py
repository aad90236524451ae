"""Write the native engine's weights as a GGUF file that llama.cpp (and load_gguf) reads.

What goes in: the architecture keys from the model's ModelConfig (so a fine-tuned or resized
model describes itself, never its source), the tensors under llama.cpp's names (q/k rows
permuted back to llama.cpp's interleaved RoPE layout for the llama family), and the tokenizer
and chat template copied from a GGUF that already has them (`tokenizer_from`: the file the
model was loaded from, or the base model's GGUF for a fine-tune). Norms stay float32, as
llama.cpp's own converter keeps them; matrices are float32 or float16 (`ftype`). Smaller types
come from llama.cpp's quantizer (backends/gguf/quantize.py), which starts from this file.

The file is written beside `out` and renamed into place, so an interrupted export leaves
nothing half-written at `out`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hanlin.backends.files import written_at
from hanlin.backends.torch.model import Transformer
from hanlin.backends.torch.weights import GGUF_LAYER, GGUF_NAMES

FTYPES = ("f32", "f16")
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")  # the writer sets these


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (interleaved RoPE pairs); the inverse of weights._unpermute."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's dense float32 weights under llama.cpp's tensor names."""
    cfg = model.config
    if cfg.arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF export covers the llama and qwen2 families; this model is {cfg.arch!r}")
    to_gguf = {v: k for k, v in GGUF_NAMES.items()}
    layer_part = {v: k for k, v in GGUF_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        w = w.detach().to(torch.float32).cpu()
        if name in to_gguf:
            out[to_gguf[name]] = w
            continue
        _, i, *rest = name.split(".")
        part, kind = ".".join(rest[:-1]), rest[-1]
        if part not in layer_part:
            raise ValueError(f"GGUF export has no llama.cpp name for the tensor {name!r}")
        if cfg.arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
            w = _permute(w, cfg.n_heads if part == "self_attn.q_proj" else cfg.n_kv_heads)
        out[f"blk.{i}.{layer_part[part]}.{kind}"] = w
    return out


def _copy_fields(reader: Any, writer: Any) -> None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED) or not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def save_gguf(model: Transformer, out: str, *, tokenizer_from: str, ftype: str = "f16") -> str:
    """Write `model` to `out` as GGUF (`ftype` f32 or f16 for the matrices); returns `out`."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType

    if ftype not in FTYPES:
        raise ValueError(f"GGUF float type {ftype!r}: choose one of {', '.join(FTYPES)} (smaller types: quantize this file)")
    cfg = model.config
    tensors = gguf_tensors(model)
    reader = GGUFReader(tokenizer_from)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{tokenizer_from} holds no tokenizer (tokenizer.ggml.tokens); name a GGUF that does")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_vocab != cfg.vocab_size:
        raise ValueError(f"{tokenizer_from}'s tokenizer has {n_vocab} tokens, the model's embedding {cfg.vocab_size}")

    with written_at(out, prefix=".hanlin-export-", suffix=".gguf") as tmp:
        w = GGUFWriter(tmp, cfg.arch)
        _copy_fields(reader, w)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.head_dim * cfg.n_heads != cfg.dim:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "linear":
            from gguf import RopeScalingType

            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        elif cfg.rope_scaling:
            raise ValueError(f"GGUF export does not write RoPE scaling {cfg.rope_scaling.get('rope_type')!r}")
        w.add_file_type(LlamaFileType.MOSTLY_F16 if ftype == "f16" else LlamaFileType.ALL_F32)
        for name, t in tensors.items():
            arr = t.numpy()
            if ftype == "f16" and arr.ndim == 2:
                w.add_tensor(name, arr.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
            else:
                w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return os.path.abspath(out)
