"""One readable decoder-only Transformer for the llama, qwen2 and internlm2 families.

Read it top to bottom: config, the op table, RoPE, attention, MLP, block, model.

The families differ only in data, not in code paths:
- llama (SmolLM2, TinyLlama, Llama 2/3, Mistral): RMSNorm, RoPE, GQA, SwiGLU, no biases.
- qwen2: the same plus biases on q/k/v; tied or untied embeddings.
- internlm2: the same math; its checkpoints pack q/k/v into one `wqkv` and use their own
  names, which weights.py unpacks into this layout.

The linear layers, q/k/v projection, norm, rope, attention and MLP go through `OPS`, a small table keyed by op name and
device kind: a device backend (nvidia/ Triton, ascend/ torch_npu fused ops) calls
`register_op("rms_norm", "cuda", fn)` and the model uses it on that device, unchanged.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, K kv heads, D head dim,
C model dim, F MLP hidden dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    arch: str = "llama"  # "llama" | "qwen2" | "internlm2" (weights layout; the math is shared)
    vocab_size: int = 32000
    dim: int = 4096  # C
    n_layers: int = 32
    n_heads: int = 32  # H
    n_kv_heads: int = 32  # K (grouped-query attention when K < H)
    head_dim: int = 0  # D; 0 means dim // n_heads
    hidden_dim: int = 11008  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "dynamic" | "llama3", ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # anything else from config.json

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


# --------------------------------------------------------------------------------------
# The op table: (op name, device kind) -> function. "any" is the portable PyTorch version.
# --------------------------------------------------------------------------------------

OPS: dict[tuple[str, str], Callable] = {}


def register_op(name: str, device_kind: str, fn: Callable) -> None:
    """Swap in a kernel for one op on one kind of device (e.g. a Triton RMSNorm on cuda)."""
    OPS[(name, device_kind)] = fn


def op(name: str, device: torch.device) -> Callable:
    return OPS.get((name, device.type)) or OPS[(name, "any")]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., C). Computed in float32 like the reference implementations, then cast back.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos, sin: (B, 1, T, D). "rotate half" layout (HF checkpoints).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # q: (B, H, T, D); k, v: (B, K, S, D); mask: (B, 1, T, S) bool (True = may attend), or None:
    # causal when T == S (a prefill), everything visible when T == 1 (a decode step). GQA: each kv head serves H // K query heads.
    gqa = q.shape[1] != k.shape[1]  # SDPA maps the H query heads onto the K kv heads itself
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1 and q.shape[2] == k.shape[2], enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    # x: (..., in) -> (..., out). A device may swap in a faster kernel (the CPU inference
    # engine does: weights pre-packed for oneDNN, see cpu_pack.py). A module standing in for the
    # linear (fine-tuning's LoRA wrapper, QLoRA's NF4 Linear4bit) runs its own forward.
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)


def qkv_proj(x: torch.Tensor, attn: "Attention") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: (B, T, C) -> q (B, T, H*D), k and v (B, T, K*D). One op, so a device can run the three
    # projections as one fused matrix (the CPU inference engine does: see cpu_pack.py).
    lin = op("linear", x.device)
    return lin(x, attn.q_proj), lin(x, attn.k_proj), lin(x, attn.v_proj)


class SiluMul(torch.autograd.Function):
    """silu(g) * u that keeps only g and u for the backward and recomputes silu(g) there:
    autograd's own version also keeps silu(g), one more (B, T, F) tensor per layer, the
    largest activation of a fine-tuning step (measured with saved_tensors_hooks, see
    hanlin.finetune.plan)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        silu = g * s
        return grad * u * (s + silu * (1 - s)), grad * silu  # d silu/dg = s * (1 + g * (1 - s))


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return SiluMul.apply(g, u)
    return F.silu(g) * u


def swiglu(x: torch.Tensor, mlp: "MLP") -> torch.Tensor:
    # x: (B, T, C) -> (B, T, F) -> (B, T, C)
    lin = op("linear", x.device)
    return lin(silu_mul(lin(x, mlp.gate_proj), lin(x, mlp.up_proj)), mlp.down_proj)


register_op("linear", "any", linear)
register_op("qkv", "any", qkv_proj)
register_op("rms_norm", "any", rms_norm)
register_op("rope", "any", apply_rope)
register_op("attention", "any", attention)
register_op("mlp", "any", swiglu)


# --------------------------------------------------------------------------------------
# RoPE frequencies, with the scaling variants these families use
# --------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,) for cfg's RoPE, scaled as config.json's rope_scaling says."""
    D, base = cfg.head_dim, cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "dynamic" and seq_len is not None and seq_len > cfg.max_seq_len:
        factor = scaling["factor"]  # NTK-aware: grow the base with the length
        base = base * ((factor * seq_len / cfg.max_seq_len) - (factor - 1)) ** (D / (D - 2))
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: linear, dynamic, llama3)")
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: (B, T) -> cos, sin: (B, 1, T, D)
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


# --------------------------------------------------------------------------------------
# The blocks
# --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return op("rms_norm", x.device)(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None, kv_len=None):
        # x: (B, T, C)
        B, T, _ = x.shape
        q, k, v = op("qkv", x.device)(x, self)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        rope = op("rope", x.device)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            # static cache: write the new keys/values at slots cache_pos, then attend over the
            # first kv_len slots (everything written so far). cache_pos is (T,), the same slots
            # for every row, or (B,) with T == 1: each row at its own length (continuous batching).
            k_cache, v_cache = cache  # (B, K, S_max, D) each
            if cache_pos.dim() == 1 and cache_pos.shape[0] == T:
                k_cache[:, :, cache_pos] = k
                v_cache[:, :, cache_pos] = v
            else:
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, cache_pos] = k[:, :, 0]  # (B, K, D) into row b's slot cache_pos[b]
                v_cache[rows, :, cache_pos] = v[:, :, 0]
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # (B, K, S, D)
        out = op("attention", x.device)(q, k, v, mask)  # (B, H, T, D)
        return op("linear", x.device)(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return op("mlp", x.device)(x, self)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow the Hugging Face llama layout, so llama/qwen2 checkpoints load
    as they are and save back as HF-compatible folders."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor | None = None,  # (B, T); default 0..T-1
        mask: torch.Tensor | None = None,  # (B, 1, T, S) bool; None = causal over T
        caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        cache_pos: torch.Tensor | None = None,  # (T,) slots the new tokens are written to; (B,) per row when T == 1
        kv_len: int | None = None,  # slots in use after this step (attention reads [0, kv_len))
        last_only: bool = False,  # logits for the last position only (decode, sampling)
        logits_at: torch.Tensor | None = None,  # (B,) one position per row (a right-padded batch); overrides last_only
        hidden_only: bool = False,  # the final-norm hidden states (B, T, C) instead of logits (training: lm_head on labelled rows only)
    ) -> torch.Tensor:
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, cache_pos, kv_len, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, cache_pos, kv_len)
        if hidden_only:
            return self.norm(x)  # (B, T, C)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:]
        return op("linear", x.device)(self.norm(x), self.lm_head).float()  # (B, T or 1, V)
