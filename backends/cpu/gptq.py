"""GPTQ: 4-bit weights whose rounding error is corrected with the layer's own input statistics.

    tokens = self_calibration(model, n_seq=32, seq_len=512)    # or text_calibration(ids, ...)
    quantized = quantize_model(model, tokens)                   # {"layers.0.self_attn.q_proj": QuantizedLinear, ...}

Round-to-nearest rounds each weight on its own. GPTQ (Frantar et al., 2022) quantizes a layer's
input columns one at a time and, after each, moves the rounding error onto the columns not yet
quantized, weighted by the inverse Hessian H = X^T X of the layer's calibration inputs X, so
that the layer's output on inputs like X changes as little as possible. Choices, measured on
the default model (WikiText-2, 2048 tokens scored, float 21.561; every projection at 4 bits,
asymmetric, groups of 32, the lm_head at int8, calibrated on other WikiText-2 text):

- act_order: columns in decreasing order of H's diagonal (the inputs that matter most are
  rounded first, while there is still room to compensate), with each group's scale and zero
  point fixed beforehand from the unmodified weights ("static groups", so the file layout stays
  plain blocks of 32 along K): 25.07 (+16.3%) without it, 23.77 (+10.2%) with it;
  onnxruntime's round-to-nearest in the same layout: 25.67 (+19.0%).
- group scale and zero point: the min/max range shrunk by up to 20% where that lowers the
  group's squared rounding error (the clipping search llama.cpp's k-quants also do).
- sequential: each block's Hessians come from the output of the blocks before it, already
  quantized, so a block also corrects what earlier rounding did to its inputs.
- calibration: by default text the model writes itself, sampled from BOS at temperature 1
  (data-free, as LLM-QAT does; nothing to download, nothing the evaluation text has seen).
  A text of the user's own (`--calibration FILE`) usually matches their use better.

The output is integers, a scale and an integer zero point per group: exactly onnxruntime's
MatMulNBits layout, so the fast int4 kernels run it unchanged (float zero points, as HQQ makes,
have no fast path there). On the default model, which is Q4_1 already, an integer zero point
cannot hold the source grid and GPTQ only partly makes up for it (the export's int4, with a
float offset per block, holds it exactly). On a model that starts in float, GPTQ against
round-to-nearest is the comparison that matters; there is no such model on this machine, so
that is not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hanlin.backends.torch import model as tm
from torch import nn

GROUP = 32
DAMP = 0.01  # fraction of H's mean diagonal added to it (GPTQ's default): keeps H invertible
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)  # range fractions tried for each group's scale


@dataclass
class QuantizedLinear:
    """An (N, K) weight as q (N, Kp) uint8 in 0..2^bits-1, scale and zero (N, Kp / group);
    w ~ (q - zero) * scale. Kp is K rounded up to the group (padding columns are zero)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int
    k: int

    def dequantize(self) -> torch.Tensor:
        g = self.group
        w = (self.q.float() - self.zero.float().repeat_interleave(g, 1)) * self.scale.repeat_interleave(g, 1)
        return w[:, : self.k]


# --------------------------------------------------------------------------------------
# calibration tokens
# --------------------------------------------------------------------------------------


def self_calibration(model: tm.Transformer, *, n_seq: int = 32, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """(n_seq, seq_len) token ids the model samples itself (temperature 1, no truncation, no
    penalty, not stopped at EOS), all sequences decoded as one batch. Each starts from BOS, or
    for a model without one (Qwen2) from EOS, its document separator; failing both, from a
    random token."""
    from hanlin.backends.base import GenerationConfig
    from hanlin.backends.torch.generate import generate_batch

    cfg = model.config
    start = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id
    if start is None:
        firsts = torch.randint(0, cfg.vocab_size, (n_seq,), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        firsts = [start] * n_seq
    gen = GenerationConfig(max_tokens=None, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=seed)
    rows = generate_batch(model, [[t] for t in firsts], gen, seq_len - 1)
    return torch.tensor([[t] + r for t, r in zip(firsts, rows)], dtype=torch.long)


def text_calibration(ids: list[int], *, n_seq: int = 32, seq_len: int = 512, bos: int | None = None) -> torch.Tensor:
    """(n, seq_len) windows of a tokenized text, spread evenly over it (BOS first when given)."""
    body = seq_len - (bos is not None)
    n = min(n_seq, len(ids) // body)
    if n < 1:
        raise ValueError(f"the calibration text is {len(ids)} tokens, less than one window of {body}")
    step = (len(ids) - body) // max(n - 1, 1)
    rows = [([bos] if bos is not None else []) + ids[i * step : i * step + body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------
# the model, block by block
# --------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(
    model: tm.Transformer,
    tokens: torch.Tensor,
    *,
    bits: int = 4,
    group: int = GROUP,
    act_order: bool = True,
    batch: int = 4,
    log: Callable[[str], None] | None = None,
) -> dict[str, QuantizedLinear]:
    """GPTQ every linear of `model` (the lm_head included) on the calibration `tokens`; returns
    them by module name. The model's weights are left as they were."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, QuantizedLinear] = {}
    saved: dict[str, torch.Tensor] = {}
    B, T = tokens.shape
    cos, sin = tm.rope_cos_sin(model.inv_freq, torch.arange(T).expand(batch, T), torch.float32)  # the same for every block
    try:
        xs = [model.embed_tokens(tokens[i : i + batch]).float() for i in range(0, B, batch)]
        for li, layer in enumerate(model.layers):
            hess = _hessians(names, lambda: [layer(x, cos[: len(x)], sin[: len(x)], None) for x in xs])
            for name, h in hess.items():
                lin = model.get_submodule(name)
                out[name] = gptq(lin.weight, h, bits=bits, group=group, act_order=act_order)
                saved[name] = lin.weight.data
                lin.weight.data = out[name].dequantize().to(lin.weight.dtype)
            xs = [layer(x, cos[: len(x)], sin[: len(x)], None) for x in xs]  # through the quantized block
            if log:
                log(f"GPTQ: block {li + 1}/{len(model.layers)}")
        hess = _hessians(names, lambda: [tm.op("linear", x.device)(model.norm(x), model.lm_head) for x in xs])
        out["lm_head"] = gptq(model.lm_head.weight, hess["lm_head"], bits=bits, group=group, act_order=act_order)
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w
    return out


def _hessians(names: dict[nn.Module, str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """X^T X / n (float64) of the input of every linear `run` calls, through the op table."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    last: list = [None, None]  # q, k and v see the same input: its product is computed once

    def capture(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        name = names[layer]
        if last[0] is not x:
            flat = x.reshape(-1, x.shape[-1]).float()
            last[0], last[1] = x, (flat.T @ flat).double()
        acc[name] = acc.get(name, 0) + last[1]
        count[name] = count.get(name, 0) + x[..., 0].numel()
        return tm.linear(x, layer)

    before = tm.OPS.get(("linear", "cpu"))
    tm.register_op("linear", "cpu", capture)
    try:
        run()
    finally:
        if before is None:
            del tm.OPS[("linear", "cpu")]
        else:
            tm.register_op("linear", "cpu", before)
    return {n: h / count[n] for n, h in acc.items()}


# --------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (N,) of each row of the group w (N, g): of the ranges
    shrunk by SHRINK, the one with the smallest squared rounding error."""
    top = 2**bits - 1
    lo0, hi0 = w.min(1).values, w.max(1).values
    best = torch.full_like(lo0, float("inf"))
    scale, zero = torch.ones_like(lo0), torch.zeros_like(lo0)
    for p in SHRINK:
        s = ((hi0 - lo0) * p / top).clamp(min=1e-10)
        z = torch.round(-lo0 * p / s).clamp(0, top)
        err = ((torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, top) - z[:, None]) * s[:, None] - w).pow(2).sum(1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def gptq(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group: int = GROUP, act_order: bool = True, damp: float = DAMP, block: int = 128) -> QuantizedLinear:
    """Quantize weight (N, K) given hessian (K, K) = E[x x^T] of its inputs."""
    N, K = weight.shape
    Kp = -(-K // group) * group
    W = torch.zeros(N, Kp)
    W[:, :K] = weight.float()
    H = torch.zeros(Kp, Kp, dtype=torch.float64)
    H[:K, :K] = hessian
    dead = torch.diag(H) == 0  # inputs that were always 0 (and the padding): weight irrelevant
    H[dead, dead] = 1
    W[:, dead] = 0
    top = 2**bits - 1
    G = Kp // group
    scale, zero = torch.empty(N, G), torch.empty(N, G)
    for g in range(G):  # static groups: fixed before any column moves
        scale[:, g], zero[:, g] = group_params(W[:, g * group : (g + 1) * group], bits)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(Kp)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diag(H).mean() * torch.eye(Kp, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # upper factor of H^-1
    Q = torch.empty(N, Kp, dtype=torch.uint8)
    for i1 in range(0, Kp, block):
        i2 = min(i1 + block, Kp)
        W1, E1 = W[:, i1:i2].clone(), torch.empty(N, i2 - i1)
        for i in range(i2 - i1):
            col = int(order[i1 + i])
            s, z = scale[:, col // group], zero[:, col // group]
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, top)
            Q[:, col] = q.to(torch.uint8)
            e = (W1[:, i] - (q - z) * s) / U[i1 + i, i1 + i]
            W1[:, i:] -= e[:, None] * U[i1 + i, i1 + i : i2][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return QuantizedLinear(Q, scale, zero.to(torch.uint8), group, K)


def pack_matmulnbits(ql: QuantizedLinear) -> tuple:
    """(B (N, Kp/group, group/2), scales (N, Kp/group), zero_points (N, ceil(G/2))) numpy arrays
    in onnxruntime's 4-bit MatMulNBits layout: two values a byte, the first in the low nibble."""
    import numpy as np

    from hanlin.backends.cpu.onnx_export import pack_nibbles

    N, Kp = ql.q.shape
    packed = pack_nibbles(ql.q.numpy()).reshape(N, Kp // ql.group, ql.group // 2)
    return packed, ql.scale.numpy().astype(np.float32), pack_nibbles(ql.zero.numpy())
