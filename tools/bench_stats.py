"""The quantization report's per-position statistics: numba kernel against the numpy reference.

    python tools/bench_stats.py [--rows 512] [--vocab 49152] [--runs 7]

Prints one JSON object: the median seconds of numpy (backends/cpu/stats.compare_numpy) and of
the numba kernel on one thread and with rows in parallel (prange), on the same random float32
logits (a candidate = the reference plus small noise, like a quantized model), measured in the
same run, runs interleaved so machine drift hits all three alike; the speed-ups over numpy; the
largest difference between the implementations; and the JIT compile time, reported apart
(the kernel is compiled without the on-disk cache, so it is a real compile; the first call
is excluded from the timings). The load average is printed too: on a shared machine another
process takes cores from the parallel kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512, help="positions (T)")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary (V)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np

    from hanlin.backends.cpu import stats
    from hanlin.devices import get_device

    why = stats.numba_missing()
    if why:
        print(json.dumps({"error": why}))
        return 1
    import numba

    rng = np.random.default_rng(args.seed)
    P = (rng.standard_normal((args.rows, args.vocab), dtype=np.float32) * 3).astype(np.float32)
    Q = P + rng.standard_normal((args.rows, args.vocab), dtype=np.float32) * np.float32(0.05)
    targets = rng.integers(0, args.vocab, args.rows)

    kernels, compile_s = {}, {}
    for name, parallel in (("numba_1_thread", False), ("numba_parallel", True)):
        kernels[name] = stats.numba_kernel(parallel, cache=False)
        compile_s[name] = round(timed(lambda: stats.compare_numba(P[:1], Q[:1], targets[:1], kernel=kernels[name])), 3)

    impls = {
        "numpy": lambda: stats.compare_numpy(P, Q, targets),
        **{name: (lambda k=k: stats.compare_numba(P, Q, targets, kernel=k)) for name, k in kernels.items()},
    }
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.runs):  # interleaved: drift hits every implementation alike
        for name, fn in impls.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    ref = stats.compare_numpy(P, Q, targets)
    diff = 0.0
    for k in kernels.values():
        got = stats.compare_numba(P, Q, targets, kernel=k)
        diff = max(diff, *(float(np.abs(getattr(got, f) - getattr(ref, f)).max()) for f in ("kl", "ref_logprob", "cand_logprob")))
        assert (got.agree == ref.agree).all()

    out = {
        "benchmark": "quant_report_row_stats",
        "shape": [args.rows, args.vocab],
        "dtype": "float32 in, float64 accumulators",
        "runs": args.runs,
        "numpy_s": round(med["numpy"], 4),
        "numba_1_thread_s": round(med["numba_1_thread"], 4),
        "numba_parallel_s": round(med["numba_parallel"], 4),
        "speedup_1_thread": round(med["numpy"] / med["numba_1_thread"], 2),
        "speedup_parallel": round(med["numpy"] / med["numba_parallel"], 2),
        "parallel_vs_1_thread": round(med["numba_1_thread"] / med["numba_parallel"], 2),
        "compile_s": compile_s,
        "max_abs_diff_vs_numpy": diff,
        "mean_kl": round(float(ref.kl.mean()), 6),
        "all_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numpy": np.__version__,
        "cpu": get_device("cpu").name or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
