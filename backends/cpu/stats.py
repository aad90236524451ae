"""Per-position statistics of a candidate model's logits against a reference's, over the
whole vocabulary: what the quantization report (`hanlin quant-report`) is made of.

    st = compare(P, Q, targets)   # P, Q: float32 (T, V) logits; targets: (T,) token ids
    st.kl          float64 (T,)   KL(softmax P || softmax Q) at each position
    st.agree       bool (T,)      argmax P == argmax Q (first index of the maximum in both)
    st.ref_logprob float64 (T,)   log softmax(P)[t, targets[t]]
    st.cand_logprob float64 (T,)  log softmax(Q)[t, targets[t]]

Two implementations of one function, the numba kernel and the numpy reference; they agree to
1e-6 (tests/test_quant_report.py). The numba kernel is what runs when numba is installed (the
`cpu` extra); `implementation()` says which one runs and why, and the report prints that.

Why a kernel: the numpy version makes a float64 copy of each block and sweeps it some eight
times (max, subtract, exp, sum, log, a second exp, a product, a sum) through memory, for each
of P and Q. The kernel reads each row twice (a max pass and an exp-sum pass that yields both
normalisers and the KL numerator at once) and allocates nothing: tools/bench_stats.py
measures the difference on 512 x 49152 logits.

Numerics, the same in both:
- softmax is taken stably: exp(x - max) summed in float64, whatever the input dtype.
- KL = sum_v p_v (log p_v - log q_v) is computed as E_p[P - Q] - lse(P) + lse(Q), where
  E_p[P - Q] = sum_v exp(P_v - max P) (P_v - Q_v) / sum_v exp(P_v - max P); one pass, and the
  cancellation is in float64 on numbers of the size of logits (~1e-14 absolute).
- -inf logits are masked tokens (probability 0): a token with p_v = 0 adds nothing (0 log 0 =
  0), whatever q_v is; a token with p_v > 0 and q_v = 0 makes KL +inf, which is the truth.
  A row with no finite logit, or with a NaN, gives NaN: garbage in is reported, not hidden.
- fastmath is off: its no-NaN/no-inf assumptions would break the -inf masking above, and
  reassociating the float64 sums would buy little, because the kernel's cost is the scalar
  exp() (numba has no vector exp without Intel's SVML, which is not installed here).
- exp is taken in float64 too. A float32 exp (expf) was measured 1.5x faster on this
  kernel, but moved the KL by ~1e-8 (numpy agreement 1e-8 instead of 1e-14) for a gain the
  report, whose time goes to the models, does not need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from hanlin.backends.base import ConfigError

__all__ = ["RowStats", "compare", "compare_numpy", "compare_numba", "implementation", "numba_kernel"]

# numpy works through the rows in blocks of this many, so its float64 temporaries stay at
# ~25 MB per array for a 49k vocabulary instead of T x V x 8 bytes.
NUMPY_BLOCK = 64


@dataclass(frozen=True)
class RowStats:
    kl: np.ndarray  # float64 (T,)
    agree: np.ndarray  # bool (T,)
    ref_logprob: np.ndarray  # float64 (T,)
    cand_logprob: np.ndarray  # float64 (T,)


def compare(P: Any, Q: Any, targets: Any, *, impl: str = "auto") -> RowStats:
    """The per-position statistics; impl "auto" (numba when installed, else numpy), "numba"
    or "numpy"."""
    if impl not in ("auto", "numba", "numpy"):
        raise ConfigError(f"impl={impl!r} is invalid: use auto, numba or numpy")
    if impl == "numpy" or (impl == "auto" and numba_missing() is not None):
        return compare_numpy(P, Q, targets)
    return compare_numba(P, Q, targets)


def implementation() -> str:
    """Which implementation `compare` runs here, in words (the report prints it)."""
    why = numba_missing()
    if why is not None:
        return f"numpy ({why}; install the cpu extra for the numba kernel)"
    import numba

    return f"numba {numba.__version__} ({'parallel over rows' if _parallel() else 'one thread'})"


def numba_missing() -> str | None:
    """None when numba can be imported, else why not."""
    try:
        import numba  # noqa: F401
    except ImportError as e:
        return f"numba not installed ({e})"
    return None


# --------------------------------------------------------------------------------------
# input checks, shared
# --------------------------------------------------------------------------------------


def _check(P: Any, Q: Any, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C-contiguous float32/float64 2-D P and Q of one shape and in-range int64 targets, or a
    ConfigError naming what is wrong."""
    P, Q = np.asarray(P), np.asarray(Q)
    targets = np.asarray(targets)
    if P.ndim != 2 or P.shape != Q.shape:
        raise ConfigError(f"P and Q must be 2-D arrays of one shape (positions, vocab); got {P.shape} and {Q.shape}")
    if targets.shape != (P.shape[0],):
        raise ConfigError(f"targets must have one id per position ({P.shape[0]}); got shape {targets.shape}")
    if P.shape[1] == 0:
        raise ConfigError("the vocabulary dimension is empty")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ConfigError(f"targets must be integer token ids, not {targets.dtype}")
    if len(targets) and (targets.min() < 0 or targets.max() >= P.shape[1]):
        raise ConfigError(f"a target id is outside the vocabulary of {P.shape[1]} (ids {targets.min()}..{targets.max()})")
    kinds = (np.float32, np.float64)
    if P.dtype not in kinds or Q.dtype not in kinds:
        raise ConfigError(f"P and Q must be float32 or float64 logits; got {P.dtype} and {Q.dtype}")
    return np.ascontiguousarray(P), np.ascontiguousarray(Q), targets.astype(np.int64)


# --------------------------------------------------------------------------------------
# numpy: the reference implementation
# --------------------------------------------------------------------------------------


def compare_numpy(P: Any, Q: Any, targets: Any) -> RowStats:
    """The reference: plain vectorised numpy in float64, NUMPY_BLOCK rows at a time."""
    P, Q, targets = _check(P, Q, targets)
    T = P.shape[0]
    kl, agree = np.empty(T), np.empty(T, dtype=bool)
    lp_p, lp_q = np.empty(T), np.empty(T)
    for s in range(0, T, NUMPY_BLOCK):
        e = min(T, s + NUMPY_BLOCK)
        p, q = P[s:e].astype(np.float64), Q[s:e].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # -inf and NaN rows are meant to flow through
            mp, mq = p.max(axis=1, keepdims=True), q.max(axis=1, keepdims=True)
            w = np.exp(p - mp)  # unnormalised p_v
            sp = w.sum(axis=1)
            lse_p = mp[:, 0] + np.log(sp)
            lse_q = mq[:, 0] + np.log(np.exp(q - mq).sum(axis=1))
            cross = np.where(w > 0, w * (p - q), 0.0).sum(axis=1)  # p_v = 0 adds nothing (0 log 0 = 0)
            kl[s:e] = cross / sp - lse_p + lse_q
        agree[s:e] = p.argmax(axis=1) == q.argmax(axis=1)
        rows = np.arange(e - s)
        lp_p[s:e] = p[rows, targets[s:e]] - lse_p
        lp_q[s:e] = q[rows, targets[s:e]] - lse_q
    return RowStats(kl, agree, lp_p, lp_q)


# --------------------------------------------------------------------------------------
# numba: the kernel
# --------------------------------------------------------------------------------------

_KERNELS: dict[bool, Any] = {}


def _parallel() -> bool:
    """Rows in parallel (numba prange) unless HANLIN_STATS_THREADS=1: rows are independent and
    each is 49k values of work, so threads split them with no sharing (bench_stats.py
    measures one thread against all)."""
    return os.environ.get("HANLIN_STATS_THREADS", "") != "1"


def numba_kernel(parallel: bool | None = None, cache: bool = True) -> Any:
    """The compiled kernel (built on first use; cache=True keeps numba's compiled code on disk
    beside this file, so the next process loads it instead of compiling again)."""
    parallel = _parallel() if parallel is None else parallel
    if cache and parallel in _KERNELS:
        return _KERNELS[parallel]
    kernel = _build(parallel, cache)
    if cache:
        _KERNELS[parallel] = kernel
    return kernel


def _build(parallel: bool, cache: bool) -> Any:
    import numba

    @numba.njit(parallel=parallel, fastmath=False, cache=cache, nogil=True)
    def row_stats(P, Q, targets, kl, agree, lp_p, lp_q):  # pragma: no cover  (compiled)
        T, V = P.shape
        for t in numba.prange(T):
            # pass 1: the maxima and their first indices
            mp, mq = -np.inf, -np.inf
            ap, aq = 0, 0
            for v in range(V):
                x, y = P[t, v], Q[t, v]
                if x > mp:
                    mp, ap = x, v
                if y > mq:
                    mq, aq = y, v
            # pass 2: both normalisers and the KL numerator, in float64
            sp, sq, cross = 0.0, 0.0, 0.0
            mp64, mq64 = np.float64(mp), np.float64(mq)
            for v in range(V):
                x, y = np.float64(P[t, v]), np.float64(Q[t, v])
                w = np.exp(x - mp64)
                sp += w
                sq += np.exp(y - mq64)
                if w > 0.0:  # p_v = 0 adds nothing, even where q_v is -inf too
                    cross += w * (x - y)
            lse_p = mp64 + np.log(sp)
            lse_q = mq64 + np.log(sq)
            kl[t] = cross / sp - lse_p + lse_q
            agree[t] = ap == aq
            lp_p[t] = np.float64(P[t, targets[t]]) - lse_p
            lp_q[t] = np.float64(Q[t, targets[t]]) - lse_q

    return row_stats


def compare_numba(P: Any, Q: Any, targets: Any, *, kernel: Any = None) -> RowStats:
    """The numba kernel (kernel: a compiled one from numba_kernel(), for benchmarks)."""
    P, Q, targets = _check(P, Q, targets)
    if P.dtype != Q.dtype:  # one compiled signature per dtype pair is enough
        P, Q = P.astype(np.float64), Q.astype(np.float64)
    T = P.shape[0]
    kl, agree = np.empty(T), np.empty(T, dtype=bool)
    lp_p, lp_q = np.empty(T), np.empty(T)
    if T:
        (kernel or numba_kernel())(P, Q, targets, kl, agree, lp_p, lp_q)
    return RowStats(kl, agree, lp_p, lp_q)
