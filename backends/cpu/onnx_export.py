"""Export the native Transformer to ONNX for ONNX Runtime, with the KV cache shared in place.

    export_onnx(model, "smol-onnx-int4", quant="int4", tokenizer_from="smol.gguf")

The graph (traced by torch.onnx.export, the dynamo exporter):

    inputs   input_ids (1, T) int64, logits_index (N,) int64,
             seqlens_k (1,) int32 = tokens in the cache after this step - 1,
             total_sequence_length () int32 = tokens in the cache after this step,
             past_key.i / past_value.i (1, K, S_max, D) float32 for every layer i
    outputs  logits (1, N, V) float32 at the positions logits_index picks (the last one while
             generating, all of them when scoring), present_key.i / present_value.i

Why attention is onnxruntime's GroupQueryAttention (com.microsoft) and not the attention torch
traces to: with plain ONNX ops the cache is a Concat of past and new keys, so every decode step
copies the whole cache of every layer. GroupQueryAttention writes the new keys and values into
the past buffer itself when present and past are the same memory; the engine binds both to one
preallocated (1, K, S_max, D) buffer per layer (I/O binding), so a step writes T rows and copies
nothing else. This is the layout onnxruntime-genai's model builder produces for its own loop.
torch traces the attention as a custom op (`hanlin::gqa`, with a reference implementation in
torch), which the exporter's custom translation table turns into that one node; the node also
applies RoPE (do_rotary, from cos/sin tables in the graph), and RMSNorm is opset 23's one
RMSNormalization op. Profiled on the default model, int4: before these two, 41% of a decode
step went to the ~20 elementwise ops per layer that spelled out RoPE and RMSNorm.

Weights, as onnxruntime's MatMulNBits in blocks of 32 values along K:
- "fp32" as traced; "int8" symmetric round-to-nearest (the Q8_0 layout, onnxruntime's quantizer).
- "int4" (the default): every projection at 4 bits with a float scale AND an offset per
  block, w = d * (q - 8) + c: the Q4_1 layout llama.cpp uses, which holds a block's range
  where an integer zero point cannot (see quantize_block_offsets). MatMulNBits takes the
  d * (q - 8) part (its fast symmetric kernel); the offsets add blocksum(x) @ C, as
  llama.cpp's Q4_1 x Q8_1 dot product adds m * sum(x): a small product whose C (one value per
  block and column) is itself an 8-bit MatMulNBits. Projections that share an input (q/k/v,
  gate/up) are one node. The lm_head is int8 (Q8_0's layout).
- "int4-gptq": GPTQ (gptq.py; calibrated) with integer zero points, every projection and
  the lm_head at 4 bits: the fastest, the least accurate on the default model.
- "int4-rtn": symmetric round-to-nearest with v_proj, down_proj and the lm_head at int8.
- "int4-hqq": HQQ with the lm_head at int8 (float zero points: no fast kernel here).
See INT8_IN_INT4, quantize_block_offsets and gptq.py for the measurements. Every MatMul is
quantized, the lm_head included (given its own weight when tied to the embedding); the
embedding lookup stays float.

The folder holds model.onnx (+ model.onnx.data), the tokenizer files (tokenizer.json ...) and
hanlin_onnx.json (the shapes the engine needs). It is written beside OUT and renamed into place.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

QUANTS = ("fp32", "int8", "int4", "int4-gptq", "int4-rtn", "int4-hqq")
BLOCK = 32
CALIB_SEQ, CALIB_LEN = 32, 512  # GPTQ calibration: 16k tokens
ARCHS = ("llama", "qwen2", "internlm2")  # what the native engine builds; all share this graph
META = "hanlin_onnx.json"


def export_onnx(model: Any, out: str, *, quant: str = "int4", tokenizer_from: str, calibration: str | None = None,
                log: Callable[[str], None] | None = None) -> str:  # fmt: skip
    """Write the Transformer `model` as an ONNX folder at `out` with `quant` weights; int4-gptq
    calibrates on the text file `calibration`, else on text the model writes itself."""
    from hanlin.backends.files import folder_written_at
    from hanlin.backends.tokenizer import write_tokenizer_files

    if quant not in QUANTS:
        raise ValueError(f"ONNX export does not take quant={quant!r}: use one of {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.arch not in ARCHS:
        raise ValueError(f"ONNX export builds {', '.join(ARCHS)} models; {cfg.arch!r} has no graph here")
    if cfg.rope_scaling and (cfg.rope_scaling.get("rope_type") or cfg.rope_scaling.get("type")) == "dynamic":
        raise ValueError("ONNX export cannot hold dynamic (NTK) RoPE scaling: its frequencies change with the length")
    if cfg.head_dim % 16:
        raise ValueError(f"ONNX export needs head_dim to be a multiple of 16 (onnxruntime's GroupQueryAttention rotates q/k itself only then); this model has {cfg.head_dim}")
    with folder_written_at(out, prefix=".hanlin-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        trace(model, path)
        write_tokenizer_files(tokenizer_from, tmp)
        if quant == "int4":
            quantize_block_offsets(path)
        elif quant == "int4-gptq":
            quantize_gptq(path, model, calibration_tokens(model, tmp, calibration, log), log)
        elif quant != "fp32":
            quantize_matmuls(path, bits=8 if quant == "int8" else 4, hqq=quant == "int4-hqq")
        meta = {
            "format": "onnx", "quant": quant, "architecture": cfg.arch, "n_layers": cfg.n_layers,
            "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_seq_len, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "block_size": BLOCK if quant != "fp32" else None,
            "calibration": (os.path.basename(calibration) if calibration else "self-generated") if quant == "int4-gptq" else None,
        }  # fmt: skip
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return os.path.abspath(out)


# --------------------------------------------------------------------------------------
# attention as one custom op, so the exporter can emit GroupQueryAttention
# --------------------------------------------------------------------------------------


def _gqa_op():
    """Define `hanlin::gqa` once: a torch reference (RoPE, cache write, causal attention) and its
    shape function for tracing; the exporter swaps the whole op for one GroupQueryAttention."""
    import torch

    if hasattr(torch.ops.hanlin, "gqa"):
        return torch.ops.hanlin.gqa

    schema = ("(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, Tensor seqlens_k, Tensor total, "
              "Tensor cos_cache, Tensor sin_cache, int num_heads, int kv_num_heads) -> (Tensor, Tensor, Tensor)")  # fmt: skip

    @torch.library.custom_op("hanlin::gqa", mutates_args=(), schema=schema)
    def gqa(q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, num_heads, kv_num_heads):
        # q (1, T, H*D), k/v (1, T, K*D), past (1, K, S_max, D), cos/sin caches (S_max, D/2):
        # the new tokens sit at positions [total - T, total): q and k are rotated there, k and v
        # land in those cache rows, and each new position attends to everything before it.
        _, T, _ = q.shape
        K, D = past_k.shape[1], past_k.shape[3]
        n = int(total)
        pos = torch.arange(n - T, n)
        cos, sin = torch.cat([cos_cache[pos]] * 2, -1)[None, :, None], torch.cat([sin_cache[pos]] * 2, -1)[None, :, None]
        qh = _rope(q.view(1, T, num_heads, D), cos, sin).transpose(1, 2)
        pk, pv = past_k.clone(), past_v.clone()
        pk[:, :, n - T : n] = _rope(k.view(1, T, K, D), cos, sin).transpose(1, 2)
        pv[:, :, n - T : n] = v.view(1, T, K, D).transpose(1, 2)
        mask = (torch.arange(n)[None, :] <= pos[:, None])[None, None]
        out = torch.nn.functional.scaled_dot_product_attention(qh, pk[:, :, :n], pv[:, :, :n], attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(1, T, num_heads * D), pk, pv

    @gqa.register_fake
    def _(q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, num_heads, kv_num_heads):
        return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)

    return torch.ops.hanlin.gqa


def _rope(x, cos, sin):
    # x (1, T, heads, D), cos/sin (1, T, 1, D): the "rotate half" layout of model.apply_rope
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _gqa_translation():
    from onnx.defs import OpSchema
    from onnxscript._internal.values import Op, Opset

    # onnx's own registry has no schema for onnxruntime's contrib ops: describe the part we use
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T"), P("value", "T"), P("past_key", "T"), P("past_value", "T"),
                P("seqlens_k", "M"), P("total_sequence_length", "M"), P("cos_cache", "T"), P("sin_cache", "T")],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[A("num_heads", OpSchema.AttrType.INT, ""), A("kv_num_heads", OpSchema.AttrType.INT, ""),
                    A("do_rotary", OpSchema.AttrType.INT, ""), A("rotary_interleaved", OpSchema.AttrType.INT, "")],
    )  # fmt: skip
    group_query_attention = Op(Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def gqa(q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, num_heads: int, kv_num_heads: int):
        # do_rotary: the kernel rotates q and k at their positions itself (no Mul/Neg/Concat per layer)
        return group_query_attention(q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache,
                                     num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0)  # fmt: skip

    return gqa


class _Decoder:
    """The traced function: the native model's weights, RMSNorm as one op, attention (with RoPE)
    through hanlin::gqa."""

    def __new__(cls, model):
        import torch
        import torch.nn.functional as F

        gqa = _gqa_op()
        cfg = model.config

        class Decoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model
                # lm_head as its own (C, V) constant, even when tied to the embedding: a MatMul on
                # a transposed shared weight is not a constant the quantizer can take, and left
                # float it is the biggest read of every decode step (V x C floats).
                self.lm_w = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous(), requires_grad=False)
                self.lm_b = model.lm_head.bias
                angles = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * model.inv_freq.double()  # (S_max, D/2)
                self.register_buffer("cos_cache", angles.cos().float())
                self.register_buffer("sin_cache", angles.sin().float())

            def forward(self, input_ids, logits_index, seqlens_k, total, *past):
                m = self.m
                C = cfg.dim
                x = m.embed_tokens(input_ids)  # (1, T, C)
                presents = []
                for i, layer in enumerate(m.layers):
                    a = layer.self_attn
                    h = F.rms_norm(x, (C,), layer.input_layernorm.weight, cfg.norm_eps)
                    o, pk, pv = gqa(a.q_proj(h), a.k_proj(h), a.v_proj(h), past[2 * i], past[2 * i + 1], seqlens_k, total,
                                    self.cos_cache, self.sin_cache, cfg.n_heads, cfg.n_kv_heads)  # fmt: skip
                    presents += [pk, pv]
                    x = x + a.o_proj(o)
                    h = F.rms_norm(x, (C,), layer.post_attention_layernorm.weight, cfg.norm_eps)
                    x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
                x = F.rms_norm(x[:, logits_index], (C,), m.norm.weight, cfg.norm_eps)
                logits = torch.matmul(x, self.lm_w)
                return (logits if self.lm_b is None else logits + self.lm_b, *presents)

        return Decoder().eval()


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "logits_index", "seqlens_k", "total_sequence_length"] + [
        f"past_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")
    ]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")]


def example_inputs(cfg: Any, T: int = 3, S: int = 16) -> tuple:
    import torch

    past = [torch.zeros(1, cfg.n_kv_heads, S, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    return (torch.arange(T)[None], torch.arange(T), torch.tensor([T - 1], dtype=torch.int32),
            torch.tensor(T, dtype=torch.int32), *past)  # fmt: skip


def trace(model: Any, path: str) -> None:
    """torch.onnx.export (dynamo) of the decoder, all weights in float32, one external data file."""
    import torch

    model = model.float().eval()
    cfg = model.config
    gqa = _gqa_op()
    T, S, N = torch.export.Dim("T", min=1), torch.export.Dim("S", min=2), torch.export.Dim("N", min=1)
    cache_dims = {2: S}
    dynamic = ({1: T}, {0: N}, None, None, tuple([cache_dims] * (2 * cfg.n_layers)))  # *past is one tuple
    with torch.no_grad():
        prog = torch.onnx.export(
            _Decoder(model), example_inputs(cfg), dynamo=True, dynamic_shapes=dynamic,
            input_names=input_names(cfg.n_layers), output_names=output_names(cfg.n_layers),
            custom_translation_table={gqa.default: _gqa_translation()}, optimize=True,
            opset_version=23,  # RMSNormalization is one op from opset 23 (else 5 elementwise ops per norm)
        )  # fmt: skip
    prog.save(path, external_data=True)


# int4-rtn (round-to-nearest, symmetric blocks of 32) keeps these at int8: the projections whose
# rounding costs the most perplexity (llama.cpp's Q4_K_M keeps attn_v, ffn_down and output at
# 6 bits for the same reason). Measured on the default model, WikiText-2, 2048 scored tokens,
# float 21.56: all int4 25.30 (+17%), lm_head at int8 23.68 (+9.8%), + down_proj 22.61 (+4.9%),
# + v_proj 22.51 (+4.4%); on the quant report's 4096 tokens this recipe is +7.6%.
INT8_IN_INT4 = ("self_attn.v_proj", "mlp.down_proj", "lm_head")
# int4-hqq: HQQ (half-quadratic: scale and zero point of each block fitted to minimise the
# weight error, no calibration data) for every projection, the lm_head at int8. 4096 tokens,
# float 23.604: 23.587 (-0.1%; HQQ with the lm_head at int4 too: 25.53). Caveat: the default
# model's only copy here is Q4_1 (asymmetric 4-bit blocks of 32), a grid an asymmetric block-32
# quantizer can nearly reproduce. Its zero points are float, which onnxruntime's CPU kernels
# have no fast path for: it decodes ~10x slower than int4 here, so it is not the default.


def quantize_matmuls(path: str, *, bits: int, hqq: bool = False) -> None:
    """Weight-only int4/int8 of every MatMul with a constant weight, in place (MatMulNBits).

    Activations are quantized to int8 per block inside the kernel (accuracy_level 4): that is
    MLAS's fast path on CPUs; float32 compute (accuracy_level 1) measured +0.24% instead of
    +1.0% perplexity for int8 but decoded at under 3 tokens/s here, against ~50.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    model = onnx.load(path)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    if bits == 8:
        model = _quantize(model, 8, accuracy=4)
    else:
        roles = ("lm_head",) if hqq else INT8_IN_INT4
        keep8 = {n.name for n in matmuls if _module(n).endswith(roles) or ("lm_head" in roles and "lm_w" in n.input)}
        model = _quantize(model, 8, accuracy=4, exclude=[n.name for n in matmuls if n.name not in keep8])
        model = _quantize(model, 4, accuracy=4, algo=HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4) if hqq else None)
    _save(model, path)


def _quantize(model, bits: int, *, accuracy: int, exclude: list[str] | None = None, algo=None, symmetric: bool = True):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=symmetric, accuracy_level=accuracy,
                             nodes_to_exclude=exclude or [], algo_config=algo)  # fmt: skip
    q.process()
    return q.model.model


def _module(node) -> str:
    """The torch module a traced node came from (the exporter records it), e.g.
    'm.layers.3.mlp.down_proj'."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [x.strip(" '\"") for x in p.value.strip("[]").split(",")]
            return next((x for x in reversed(scopes) if "." in x), "")
    return ""


def calibration_tokens(model: Any, folder: str, calibration: str | None, log: Callable[[str], None] | None):
    """GPTQ's calibration: windows of the text file `calibration`, tokenized by the tokenizer
    just written to `folder`, or text the model writes itself."""
    from hanlin.backends.cpu import gptq

    if calibration is None:
        if log:
            log(f"GPTQ: the model writes its calibration text ({CALIB_SEQ} x {CALIB_LEN} tokens)")
        return gptq.self_calibration(model, n_seq=CALIB_SEQ, seq_len=CALIB_LEN)
    from hanlin.backends.tokenizer import HFTokenizer

    try:
        with open(calibration, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration text {calibration!r} cannot be read as UTF-8 text: {e}") from e
    ids = HFTokenizer(folder).encode(text, add_bos=False, special=False)
    return gptq.text_calibration(ids, n_seq=CALIB_SEQ, seq_len=CALIB_LEN, bos=model.config.bos_token_id)


def quantize_gptq(path: str, model: Any, tokens: Any, log: Callable[[str], None] | None = None) -> None:
    """int4: GPTQ every projection and the lm_head of `model` on `tokens`, written over the
    MatMulNBits nodes that onnxruntime's asymmetric quantizer lays out (names, shapes, the
    attributes), so the graph is the one onnxruntime itself would write."""
    import onnx
    from onnx import numpy_helper

    from hanlin.backends.cpu import gptq

    quantized = gptq.quantize_model(model, tokens, log=log)
    graph = onnx.load(path)
    matmul_of = {n.output[0]: n for n in graph.graph.node if n.op_type == "MatMul"}
    graph = _quantize(graph, 4, accuracy=4, symmetric=False)
    inits = {t.name: t for t in graph.graph.initializer}
    done = 0
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits" or node.output[0] not in matmul_of:
            continue
        mm = matmul_of[node.output[0]]
        name = "lm_head" if "lm_w" in mm.input else _module(mm).removeprefix("m.")
        if name not in quantized:
            raise RuntimeError(f"GPTQ has no weights for the MatMul of {name!r}")
        for tensor_name, array in zip(node.input[1:4], gptq.pack_matmulnbits(quantized.pop(name))):
            old = inits[tensor_name]
            if tuple(old.dims) != array.shape:
                raise RuntimeError(f"GPTQ's {tensor_name} is {array.shape}, onnxruntime's layout {tuple(old.dims)}")
            old.CopyFrom(numpy_helper.from_array(array, tensor_name))
        done += 1
    if quantized:
        raise RuntimeError(f"GPTQ quantized linears the graph has no MatMul for: {sorted(quantized)}")
    _save(graph, path)


def _save(model: Any, path: str) -> None:
    import onnx

    data = os.path.basename(path) + ".data"
    os.remove(os.path.join(os.path.dirname(path), data))
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data)


# int4, measured on the default model (WikiText-2): on the quant report's 4096 scored tokens
# (float 23.604) this layout with float offsets 23.656 (+0.22%, KL 0.0032, top-1 95.8%),
# int4-rtn 25.409 (+7.6%), int4-gptq 26.485 (+12.2%). The default model is Q4_1 with a Q8_0
# embedding: the 4-bit codes, the scales and the int8 lm_head hold it exactly; what is left is
# the kernel's int8 activations (the GGUF itself in llama.cpp: +0.21%). The lm_head in this
# layout at 4 bits instead: +5.6% (2048 tokens). A model that starts in float gets llama.cpp's
# Q4_1 round-to-nearest (block minimum and maximum).
# The offsets' product was a float MatMul: it read C as float32, 13 MB a token on the default
# model (a quarter of the 4-bit weights' 53 MB), and took 17% of a decode step's kernel time
# (ONNX Runtime's profiler; the block sums another 7%). As an 8-bit MatMulNBits
# (offsets_int8) it reads a quarter of that: decode went from 0.93x to 1.02-1.07x llama.cpp's
# Q4_1 (tools/bench_decode.py, two runs, all rows in each). The 8-bit rounding costs no more
# than any change of this size: against float offsets, KL 0.0042 on 1792 WikiText-2 tokens,
# where moving every C by a random 0.04% of its column's largest value gives 0.0036 and 0.4%
# gives 0.0041 (the floor the int8 activations' rounding sets); perplexity 21.50 against 21.54.
# The block sums were a MatMul with a (K, K/32) ones matrix (float32: 12 MB a token, most of
# it zeros); Reshape + ReduceSum reads only x. tools/bench_decode.py after it, on 4 KiB pages:
# 1.13x and 1.09x llama.cpp (two runs), against 1.02-1.07x before. (The same comparison inside
# one process is not to be trusted here: two copies of one graph loaded side by side measured
# 147 and 134 tok/s.)
def quantize_block_offsets(path: str) -> None:
    """int4: every projection as w = d * (q - 8) + c per block of 32 (d float, c at 8 bits),
    run as MatMulNBits (d, q) plus blocksum(x) @ C (an 8-bit MatMulNBits); projections sharing
    an input fused into one node and split after (q/k/v go to GroupQueryAttention packed,
    unsplit); the lm_head int8 (onnxruntime's quantizer)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    lm_head = [n.name for n in matmuls if "lm_w" in n.input]
    model = _quantize(model, 8, accuracy=4, exclude=[n.name for n in matmuls if n.name not in lm_head])
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = {}  # input -> the MatMuls with a constant weight that read it
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in weights:
            groups.setdefault(n.input[0], []).append(n)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inserted, removed, used = {}, set(), set()
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "blocksum_axes"))
    for x, members in groups.items():
        ws = [numpy_helper.to_array(weights[n.input[1]]).astype(np.float32) for n in members]
        K = ws[0].shape[0]
        if K % BLOCK:
            raise ValueError(f"int4 needs every projection's input width to be a multiple of {BLOCK}; {members[0].name} has {K}")
        G = K // BLOCK
        blocks, sums = x + "_blocks", x + "_blocksum"
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, G, BLOCK], np.int64), blocks + "_shape"))
        nodes = [helper.make_node("Reshape", [x, blocks + "_shape"], [blocks], name=blocks),  # (1, T, K) -> (1, T, G, 32)
                 helper.make_node("ReduceSum", [blocks, "blocksum_axes"], [sums], name=sums, keepdims=0)]  # (1, T, G): each block's sum
        q, d, c = _block_offsets(np.concatenate(ws, axis=1).T)  # (N, K) as (N, K) uint8, (N, G), (N, G)
        N = q.shape[0]
        base = members[0].output[0]
        names = [base + "_Q4", base + "_scales", base + "_offsets_Q8", base + "_offsets_scales"]
        c8, s8 = offsets_int8(c.T)
        graph.initializer.extend([numpy_helper.from_array(pack_nibbles(q).reshape(N, G, BLOCK // 2), names[0]), numpy_helper.from_array(d, names[1]),
                                  numpy_helper.from_array(c8, names[2]), numpy_helper.from_array(s8, names[3])])  # fmt: skip
        y = base + "_fused" if len(members) > 1 else base
        nodes += [helper.make_node("MatMulNBits", [x, names[0], names[1]], [y + "_main"], name=y + "_main", domain="com.microsoft",
                                   K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=4),
                  helper.make_node("MatMulNBits", [sums, names[2], names[3]], [y + "_offset"], name=y + "_offset", domain="com.microsoft",
                                   K=G, N=N, bits=8, block_size=BLOCK, accuracy_level=4)]  # fmt: skip
        outs = [n.output[0] for n in members]
        adds = [_bias_add(o, consumers, weights) for o in outs]  # qwen2: q/k/v each get a bias after the MatMul
        heads = [a.output[0] for a in adds] if all(adds) else outs
        gqa = [u for u in consumers.get(heads[0], []) if u.op_type == "GroupQueryAttention"]
        users = consumers.get(y, [])
        if len(members) == 1 and len(users) == 1 and users[0].op_type == "Add":  # a residual add: one Sum of three
            add = users[0]
            other = [i for i in add.input if i != y][0]
            add.op_type = "Sum"
            del add.input[:]
            add.input.extend([other, y + "_main", y + "_offset"])
        elif len(members) == 3 and len(gqa) == 1 and list(gqa[0].input[:3]) == heads and all(len(consumers[h]) == 1 for h in heads):
            # q/k/v: GroupQueryAttention takes them packed (key and value left empty): no Split,
            # and their biases, if any, are one more term of the sum
            terms = [y + "_main", y + "_offset"]
            if heads is not outs:
                biases = [next(i for i in a.input if i in weights) for a in adds]
                graph.initializer.append(numpy_helper.from_array(np.concatenate([numpy_helper.to_array(weights[b]).astype(np.float32) for b in biases]), y + "_bias"))
                terms.append(y + "_bias")
                removed.update(id(a) for a in adds)
                used.update(biases)
            nodes.append(helper.make_node("Sum" if len(terms) > 2 else "Add", terms, [y], name=y + "_add"))
            gqa[0].input[0], gqa[0].input[1], gqa[0].input[2] = y, "", ""
        else:
            nodes.append(helper.make_node("Add", [y + "_main", y + "_offset"], [y], name=y + "_add"))
            if len(members) > 1:
                split = base + "_split"
                graph.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in ws], np.int64), split))
                nodes.append(helper.make_node("Split", [y, split], outs, name=split, axis=-1))
        inserted[id(members[0])] = nodes
        removed.update(id(n) for n in members)
        used.update(n.input[1] for n in members)
    order = []
    for n in graph.node:  # the new nodes where the group's first member stood: after x, before any use
        order += inserted.get(id(n), [])
        if id(n) not in removed:
            order.append(n)
    del graph.node[:]
    graph.node.extend(order)
    kept = [t for t in graph.initializer if t.name not in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _save(model, path)


def _bias_add(output: str, consumers: dict, weights: dict):
    """The Add that puts a constant bias on `output`, when that is its only use; else None."""
    users = consumers.get(output, [])
    if len(users) == 1 and users[0].op_type == "Add" and any(i in weights and len(weights[i].dims) == 1 for i in users[0].input):
        return users[0]
    return None


def pack_nibbles(a):
    """uint8 values 0..15 (.., n) -> (.., ceil(n/2)) bytes, two a byte, the first in the low
    nibble: onnxruntime's 4-bit MatMulNBits layout for weights and zero points (an odd count
    is padded with 0)."""
    import numpy as np

    a = np.asarray(a, dtype=np.uint8)
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), np.uint8)], axis=-1)
    return a[..., 0::2] | (a[..., 1::2] << 4)


def offsets_int8(c):
    """The offsets C (G, N) float32 -> MatMulNBits' 8-bit layout: q (N, ceil(G/32), 32) uint8
    and s (N, ceil(G/32)) float32 with C ~ s * (q - 128), symmetric per column and block of 32
    offsets (G padded with zeros): each value within half a step, max|C| / 254, of its own."""
    import numpy as np

    G, N = c.shape
    blocks = -(-G // BLOCK)
    padded = np.zeros((blocks * BLOCK, N), np.float32)
    padded[:G] = c
    cols = padded.T.reshape(N, blocks, BLOCK)
    s = np.abs(cols).max(-1) / 127
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    q = (np.clip(np.round(cols / s[..., None]), -127, 127) + 128).astype(np.uint8)
    return q, s


def _block_offsets(w):
    """w (N, K) float32 -> q (N, K) uint8 in 0..15, d and c (N, K/32) float32 with
    w ~ d * (q - 8) + c: each block's minimum maps to q = 0 and its maximum to q = 15 (Q4_1's
    round-to-nearest; exact when w is a Q4_1 grid already)."""
    import numpy as np

    N, K = w.shape
    blocks = w.reshape(N, K // BLOCK, BLOCK)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = (hi - lo) / 15
    d = np.where(d > 0, d, 1.0).astype(np.float32)
    q = np.clip(np.round((blocks - lo[..., None]) / d[..., None]), 0, 15).astype(np.uint8).reshape(N, K)
    return q, d, (lo + 8 * d).astype(np.float32)
