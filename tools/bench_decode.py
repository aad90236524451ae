"""Decode speed: hanlin's GGUF engine against raw llama-cpp-python, same run, same settings.

    python tools/bench_decode.py [--model PATH_OR_NAME] [--tokens 128] [--runs 5] [--threads N]

Both sides load the same .gguf with the same context size and thread count, take the same
prompt token ids (the chat template rendered by hanlin) and decode greedily, so they produce
the same tokens. Runs alternate (raw, hanlin, raw, hanlin, ...) so drift in machine load hits
both; each side's figure is the median over runs of decode tokens/s, counted from the first
generated token to the last (prefill is reported separately as time to first token).
The SDK's cost is the ratio hanlin / raw; the target is >= 0.95. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the sea, the town and the people."


def raw_run(llm, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """Raw llama-cpp-python: Llama.generate greedy, n tokens (or until EOS)."""
    llm.reset()
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    eos = llm.token_eos()
    for tok in llm.generate(ids, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(tok)
        if tok == eos or len(out) >= n:
            break
    t_end = time.perf_counter()
    return t_first - t0, (len(out) - 1) / (t_end - t_first), out


def hanlin_run(llm, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """hanlin: the SDK's streaming path, the one `hanlin chat` uses."""
    llm.engine.reset()
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for ev in llm.generate_ids(ids, stream=True, max_tokens=n, temperature=0.0, repeat_penalty=1.0):
        if t_first is None:
            t_first = time.perf_counter()
        if ev.token_id is not None:
            out.append(ev.token_id)
    t_end = time.perf_counter()
    return t_first - t0, (len(out) - 1) / (t_end - t_first), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx-size", type=int, default=2048)
    args = ap.parse_args(argv)

    import llama_cpp

    import hanlin

    llm = hanlin.load(args.model, device="cpu", engine="gguf", ctx_size=args.ctx_size, threads=args.threads, pull_missing=True)
    threads = llm.engine.threads
    raw = llama_cpp.Llama(model_path=llm.model.path, n_ctx=args.ctx_size, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    ids = llm.chat_ids([{"role": "user", "content": PROMPT}])

    # warm-up both (page in the weights, allocate buffers)
    raw_run(raw, ids, 8)
    hanlin_run(llm, ids, 8)

    raw_rates, hl_rates, raw_ttft, hl_ttft = [], [], [], []
    same = True
    n_tokens = None
    for _ in range(args.runs):
        t, r, raw_ids = raw_run(raw, ids, args.tokens)
        raw_ttft.append(t)
        raw_rates.append(r)
        t, r, hl_ids = hanlin_run(llm, ids, args.tokens)
        hl_ttft.append(t)
        hl_rates.append(r)
        same = same and raw_ids == hl_ids
        n_tokens = len(hl_ids)

    raw_med = statistics.median(raw_rates)
    hl_med = statistics.median(hl_rates)
    result = {
        "benchmark": "decode_tokens_per_second",
        "model": llm.name,
        "model_path": llm.model.path,
        "engine": "gguf",
        "threads": threads,
        "prompt_tokens": len(ids),
        "generated_tokens": n_tokens,
        "runs": args.runs,
        "hanlin_tok_s": round(hl_med, 2),
        "raw_llama_cpp_tok_s": round(raw_med, 2),
        "ratio": round(hl_med / raw_med, 4),
        "target_ratio": 0.95,
        "meets_target": hl_med / raw_med >= 0.95,
        "same_tokens": same,
        "hanlin_ttft_s": round(statistics.median(hl_ttft), 4),
        "raw_ttft_s": round(statistics.median(raw_ttft), 4),
        "hanlin_tok_s_all": [round(x, 2) for x in hl_rates],
        "raw_tok_s_all": [round(x, 2) for x in raw_rates],
        "llama_cpp_python": llama_cpp.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    raw.close()
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
