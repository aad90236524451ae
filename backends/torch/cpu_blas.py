"""CPU decode kernel: single-token float32 matrix-vector products through NumPy's BLAS.

Why: decoding one token multiplies every weight matrix by one vector (a GEMV), so its speed
is the speed at which the weights stream from memory. On the 2-core development machine
PyTorch's CPU GEMV streamed cold weights at 15 GB/s whatever its thread count, NumPy's
OpenBLAS sgemv at 35 GB/s; the whole model decoded at 22 tok/s against 59 tok/s (float32,
SmolLM2-135M). Only the shape that benefits takes this path: a single-sequence decode step, float32, no
autograd; everything else (prefill, batched decode, training, other dtypes) stays on F.linear
(for 8 rows NumPy's sgemm streamed at 16.8 GB/s against PyTorch's 11.9, but the whole batched
decode step was no faster, so batches keep PyTorch with every core).

The two thread pools must not fight: OpenMP threads that spin-wait next to OpenBLAS's make
both crawl, so the BLAS path is taken only inside `decode_threads()`, which runs PyTorch
single-threaded around a decode step (its other ops are tiny) and restores it after: prefill,
even of a single token, stays on PyTorch with every core.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.backends.torch.model import register_op

try:
    import numpy as _np  # noqa: F401  (the BLAS comes with it)

    AVAILABLE = True
except ImportError:  # pragma: no cover - numpy ships with every torch install we support
    AVAILABLE = False


def blas_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    # x: (..., in) with one row in all -> (..., out)
    w = layer.weight
    rows = x.numel() // x.shape[-1]
    if not _in_decode or torch.is_grad_enabled() or x.dtype != torch.float32 or w.dtype != torch.float32 or rows > MAX_ROWS:
        return F.linear(x, w, layer.bias)
    xn = x.detach().reshape(rows, x.shape[-1]).numpy()
    y = torch.from_numpy(xn @ w.detach().numpy().T)  # (rows, out): one pass over the weights
    if layer.bias is not None:
        y = y + layer.bias.detach()
    return y.reshape(*x.shape[:-1], w.shape[0])


def install() -> bool:
    """Route CPU linears through blas_linear (idempotent). False when NumPy is missing."""
    if AVAILABLE:
        register_op("linear", "cpu", blas_linear)
    return AVAILABLE


MAX_ROWS = 1  # batched decode steps stay on PyTorch's GEMM: NumPy's was no faster for 8 rows here
_in_decode = False  # blas_linear takes the BLAS path only inside decode_threads()


@contextlib.contextmanager
def decode_threads() -> Iterator[None]:
    global _in_decode
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _in_decode = True
    try:
        yield
    finally:
        _in_decode = False
        torch.set_num_threads(before)
