"""CPU inference kernel: linear layers whose weights are pre-packed for oneDNN.

Why: on the CPU every token of a decode step multiplies each weight matrix by a few rows, so
speed is how fast the weights stream from memory. PyTorch's plain `F.linear` takes a generic
GEMM path for these skinny shapes and streamed about 12-15 GB/s on the 2-core development
machine. Reordering each weight once into oneDNN's blocked layout (what Inductor's CPU
"freezing" does) lets oneDNN's small-batch kernels stream them at the memory's speed. Measured
there on SmolLM2-135M's weight shapes, per decode step (all linears, float32, 2 threads):

    rows   F.linear   packed                    (bfloat16: rows 1: 14.9 -> 6.5 ms,
      1    30.2 ms    14.8 ms                               rows 8: 21.3 -> 9.0 ms)
      8    46.8 ms    15.6 ms
    240   371.5 ms   179.7 ms (a prefill)

The layout is packed for a batch of 8 (`BATCH_HINT`): packed for 1 row instead, 8-row steps
took 27.8 ms, while 1-row steps gained nothing. An earlier version sent single-row steps
through NumPy's OpenBLAS GEMV (11.2 ms for the same step) with PyTorch single-threaded around
it; in the whole model that was within 5-10% of the packed path, which also serves batches,
prefill and bfloat16 on one thread pool, so it was dropped.

Projections that read the same input are packed as one matrix: q/k/v (the model's "qkv" op)
and gate/up (its "mlp" op). On the same machine that took the 30 layers' q/k/v from 2.70 to
2.01 ms per single-row step and gate/up from 6.34 to 5.85 ms (fewer, wider products).

Memory: the dense weights are released when they are packed (`pack_linears`), so the model does
not grow, except a head tied to the embedding, whose dense copy the embedding lookup still needs.
A packed model is for inference: autograd through it raises, and `unpack_linears` restores
the dense weights exactly (training and saving use those).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.backends.torch.model import MLP, Attention, attention, op, qkv_proj, register_op, swiglu

BATCH_HINT = 8  # rows the blocked layout is tuned for (see the module docstring)
PACKABLE = (torch.float32, torch.bfloat16)


@dataclass
class Packed:
    """One oneDNN-packed matrix standing for the concatenated (out, in) weights of some linears."""

    weight: torch.Tensor  # opaque mkldnn tensor, (sum(sizes), in)
    bias: torch.Tensor | None  # (sum(sizes),) dense, or None
    sizes: list[int]  # each linear's out features, in order

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., sum(sizes))
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("this model's linear layers are packed for CPU inference; call hanlin.backends.torch.cpu_pack.unpack_linears(model) before training it")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)


# ---- the ops the CPU registers: packed when the module carries a Packed, the portable code otherwise


def packed_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    packed = getattr(layer, "cpu_packed", None)
    if packed is not None:
        return packed(x)
    if type(layer) is not nn.Linear:  # a module standing in for the linear (a LoRA wrapper) runs its own forward
        return layer(x)
    if layer.weight.numel() == 0:
        raise RuntimeError("this linear layer was packed into a fused projection (cpu_pack.py): call unpack_linears(model) to use it alone")
    return F.linear(x, layer.weight, layer.bias)


def packed_qkv(x: torch.Tensor, attn: Attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = getattr(attn, "cpu_packed", None)
    if packed is None:
        return qkv_proj(x, attn)
    q, k, v = packed(x).split(packed.sizes, dim=-1)  # (B, T, H*D), (B, T, K*D), (B, T, K*D)
    return q, k, v


def packed_swiglu(x: torch.Tensor, mlp: MLP) -> torch.Tensor:
    packed = getattr(mlp, "cpu_packed", None)
    if packed is None:
        return swiglu(x, mlp)
    gate, up = packed(x).split(packed.sizes, dim=-1)  # (B, T, F) each
    return op("linear", x.device)(F.silu(gate) * up, mlp.down_proj)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # q: (B, H, T, D); k, v: (B, K, S, D). PyTorch's CPU attention kernel is slow in bfloat16 for
    # decode steps: measured 379 us against 107 us for the same step cast to float32 and back
    # (8 rows, 120 cached tokens), which made a bfloat16 batch step slower than a float32 one.
    if q.dtype == torch.bfloat16 and q.shape[2] == 1:
        return attention(q.float(), k.float(), v.float(), mask).to(q.dtype)
    return attention(q, k, v, mask)


def available() -> bool:
    """True when this torch build packs linears and the packed product is right (checked once
    on a small layer, so a build whose private oneDNN ops changed falls back to F.linear)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(24, 40, generator=g), torch.randn(3, 40, generator=g)
            _AVAILABLE = bool(torch.backends.mkldnn.is_available()) and torch.allclose(Packed(_pack(w), None, [24])(x), x @ w.T, atol=1e-4)
        except (RuntimeError, AttributeError):
            _AVAILABLE = False
    return _AVAILABLE


_AVAILABLE: bool | None = None


def pack_linears(model: nn.Module) -> int:
    """Pack model's CPU float32/bfloat16 linears in place, q/k/v and gate/up fused; returns how
    many linears were packed (0 when this torch build cannot). Idempotent."""
    if not available():
        return 0
    register_op("linear", "cpu", packed_linear)
    register_op("qkv", "cpu", packed_qkv)
    register_op("mlp", "cpu", packed_swiglu)
    register_op("attention", "cpu", cpu_attention)
    tied = _tied_to_other_modules(model)
    count = 0
    for module in model.modules():  # fused groups first, so their members are taken
        if isinstance(module, Attention):
            count += _pack_group(module, [module.q_proj, module.k_proj, module.v_proj], tied)
        elif isinstance(module, MLP):
            count += _pack_group(module, [module.gate_proj, module.up_proj], tied)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.numel():  # empty: already in a fused group
            count += _pack_group(module, [module], tied)
    return count


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed blocks of this size on its heap
    (its mmap threshold grows as big blocks are freed), so without this, releasing the dense
    weights did not shrink the process: measured 1353 MB resident after packing the default
    model, 951 MB with a trim after each group. Not glibc (macOS, musl): nothing to do."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (AttributeError where the C library has none)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _pack_group(owner: nn.Module, layers: list[nn.Linear], tied: set[int]) -> int:
    ws = [layer.weight for layer in layers]
    if getattr(owner, "cpu_packed", None) is not None or any(w.device.type != "cpu" or w.dtype not in PACKABLE for w in ws):
        return 0
    if len(layers) > 1 and any(id(w) in tied for w in ws):
        return 0  # a weight shared outside the group: its layers are packed one by one instead
    biases = [layer.bias for layer in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for b, w in zip(biases, ws)])
    owner.cpu_packed = Packed(_pack(torch.cat([w.detach() for w in ws]).contiguous()), bias, [w.shape[0] for w in ws])
    for w in ws:
        if id(w) not in tied:  # the packed matrix is now the only copy; a head tied to the embedding keeps its dense one for the lookup
            w.data = torch.empty(0, dtype=w.dtype)
    _return_freed_memory()
    return len(layers)


def unpack_linears(model: nn.Module) -> None:
    """Give the linears back their dense weights (bit-exact) and drop the packed matrices."""
    for module in model.modules():
        packed = getattr(module, "cpu_packed", None)
        if packed is None:
            continue
        layers = [module] if isinstance(module, nn.Linear) else [module.q_proj, module.k_proj, module.v_proj] if isinstance(module, Attention) else [module.gate_proj, module.up_proj]
        dense = packed.weight.to_dense()
        for layer, part in zip(layers, dense.split(packed.sizes, dim=0)):
            if layer.weight.numel() == 0:
                layer.weight.data = part.contiguous()
        module.cpu_packed = None


def _tied_to_other_modules(model: nn.Module) -> set[int]:
    """ids of Linear weights that a non-Linear module also holds (a head tied to the embedding)."""
    others = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in others}
