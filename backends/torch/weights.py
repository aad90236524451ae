"""Build the native Transformer from a Hugging Face folder or a GGUF file, and save it back.

- HF folder: config.json + model.safetensors, or shards with model.safetensors.index.json.
  llama and qwen2 names load as they are; internlm2's packed `wqkv` is unpacked here.
- GGUF: read and dequantized with the `gguf` package (no transformers). llama.cpp's
  converter permutes the q/k rows of llama-architecture models for its interleaved RoPE;
  they are permuted back to the "rotate half" layout this model (and HF) uses.
- Save: safetensors + config.json in the llama layout, written to a temporary folder and
  renamed into place, so an interrupted save never leaves half a checkpoint.

Errors name the tensor: a missing or unexpected weight, or a shape that disagrees with
the config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable

import torch

from hanlin.backends.base import ModelError
from hanlin.backends.torch.archs import SUPPORTED_ARCHS, native_arch
from hanlin.backends.torch.model import ModelConfig, Transformer, rope_inv_freq



# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = native_arch(cfg)
    if arch is None:
        raise UnsupportedArchitecture(archs or [cfg.get("model_type")])
    n_heads = cfg["num_attention_heads"]
    # transformers 5 writes RoPE settings as rope_parameters {rope_type, rope_theta, factor, ...};
    # older configs as rope_theta + rope_scaling
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if rope and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return ModelConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", cfg.get("bias", False))),
        o_bias=bool(cfg.get("attention_bias", False)) if arch == "llama" else bool(cfg.get("bias", False)) and arch == "internlm2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A llama-layout (or qwen2, which has the same names) config.json for this model."""
    arch = "Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"
    out = {
        "architectures": [arch],
        "model_type": "qwen2" if cfg.arch == "qwen2" else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }  # fmt: skip
    if cfg.arch != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    return out


class UnsupportedArchitecture(ModelError):
    def __init__(self, archs: Iterable[Any]):
        self.archs = list(archs)
        super().__init__(
            f"architecture {', '.join(map(str, self.archs))} is not one the native engine builds "
            f"(it builds {', '.join(sorted(SUPPORTED_ARCHS))}); the transformers fallback engine (--engine hf) runs others"
        )


# --------------------------------------------------------------------------------------
# loading state dicts into the model, with errors that name the tensor
# --------------------------------------------------------------------------------------


def load_state(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelError(f"{source}: missing weight {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ModelError(f"{source}: unexpected weight {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + "; is the config's architecture right?")
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ModelError(f"{source}: weight {name} has shape {list(got.shape)} but the config needs {list(want.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def native_name(name: str) -> str:
    """A transformers llama-layout parameter name -> this model's (no "model." level)."""
    name = name[len("model.") :] if name.startswith("model.") else name
    return name


def hf_name(name: str) -> str:
    """This model's parameter or module name -> transformers' llama layout (native_name's inverse)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def unpack_internlm2(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """internlm2 names and the packed wqkv -> this model's llama layout.

    wqkv rows are grouped per kv head: [q_1 .. q_g, k, v] with g = n_heads / n_kv_heads query
    heads per group, each head_dim rows: (K * (g + 2) * D, C).
    """
    out: dict[str, torch.Tensor] = {}
    g, D, K = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.n_kv_heads
    rename = {
        "tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "output.weight": "lm_head.weight",
    }  # fmt: skip
    per_layer = {
        "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }  # fmt: skip
    for name, t in state.items():
        name = native_name(name)
        if name in rename:
            out[rename[name]] = t
            continue
        m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if not m:
            out[name] = t  # reported as unexpected by load_state
            continue
        i, part, kind = m.groups()
        if part == "attention.wqkv":
            grouped = t.reshape(K, g + 2, D, *t.shape[1:])
            out[f"layers.{i}.self_attn.q_proj.{kind}"] = grouped[:, :g].reshape(K * g * D, *t.shape[1:])
            out[f"layers.{i}.self_attn.k_proj.{kind}"] = grouped[:, g].reshape(K * D, *t.shape[1:])
            out[f"layers.{i}.self_attn.v_proj.{kind}"] = grouped[:, g + 1].reshape(K * D, *t.shape[1:])
        elif part in per_layer:
            out[f"layers.{i}.{per_layer[part]}.{kind}"] = t
        else:
            out[name] = t
    return out


# --------------------------------------------------------------------------------------
# HF folders
# --------------------------------------------------------------------------------------


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise ModelError(f"{folder}: shard {shard} named in model.safetensors.index.json is missing")
            state.update(load_file(path))
        return state
    if os.path.isfile(single):
        return load_file(single)
    raise ModelError(f"{folder} has no model.safetensors (or model.safetensors.index.json with shards)")


def load_hf_folder(folder: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        cfg = config_from_hf(raw)
    except KeyError as e:
        raise ModelError(f"{cfg_path} lacks {e.args[0]!r}") from None
    state = read_safetensors(folder)
    if cfg.arch == "internlm2":
        state = unpack_internlm2(state, cfg)
    else:
        state = {native_name(k): v for k, v in state.items()}
    return _build(cfg, state, folder, dtype, device)


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype, device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v.to(dtype=dtype, device=device) for k, v in state.items()}
    load_state(model, state, source)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # the buffer was made on the meta device
    return model.eval()


def save_hf_folder(model: Transformer, out_dir: str) -> None:
    """Write model.safetensors + config.json atomically (temp folder, then rename)."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hanlin-save-", dir=parent)
    try:
        state = {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_to_hf(model.config), f, indent=2)
        if os.path.exists(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------

GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def config_from_gguf(md: dict[str, Any]) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UnsupportedArchitecture([f"gguf:{arch}"])

    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return ModelConfig(
        arch=arch,
        vocab_size=int(get("vocab_size") or len(md.get("tokenizer.ggml.tokens") or [])),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", dim // n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(get("context_length", 4096)),
        qkv_bias=arch == "qwen2",
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    md: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            md[key] = range(len(fld.data))  # only the length matters here
            continue
        try:
            md[key] = fld.contents()
        except Exception:
            pass
    cfg = config_from_gguf(md)
    if cfg.vocab_size == 0:
        cfg.vocab_size = len(md.get("tokenizer.ggml.tokens", []))
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dim first
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
        name = GGUF_NAMES.get(t.name)
        if name is None:
            m = re.match(r"blk\.(\d+)\.(\w+)\.(weight|bias)$", t.name)
            if not m or m.group(2) not in GGUF_LAYER:
                name = t.name  # reported as unexpected by load_state
            else:
                i, part, kind = m.groups()
                name = f"layers.{i}.{GGUF_LAYER[part]}.{kind}"
                if cfg.arch == "llama" and part in ("attn_q", "attn_k"):
                    w = _unpermute(w, cfg.n_heads if part == "attn_q" else cfg.n_kv_heads)
        state[name] = w.to(dtype)  # now, not in _build: a float32 copy of every tensor at once doubles a bfloat16 load's peak
    if "lm_head.weight" not in state:
        cfg.tie_embeddings = True
    return _build(cfg, state, path, dtype, device)
