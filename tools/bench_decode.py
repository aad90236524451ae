"""Decode speed of every engine on the same model, prompt and settings, in one run.

    python tools/bench_decode.py [--model NAME_OR_GGUF] [--tokens 128] [--runs 5] [--rows ...] [--folder ROW=PATH ...]
                                 [--small-pages ROW ...]

Two parts, printed as one JSON object:

1. "sdk_overhead": hanlin's GGUF engine against raw llama-cpp-python (`Llama.generate`, the
   loop hanlin wraps), in one process, runs alternating (raw, hanlin, raw, ...) so machine
   drift hits both. Figure: median decode tokens/s, from the first generated token to the
   last (prefill reported apart as time to first token). Target: ratio >= 0.95.
2. "rows": one child process per row and run, so each row's peak RSS is its own, with the
   rows taking turns (one run of each per round) so machine drift hits them alike:
   llama-cpp-python (the file's own quantization), hanlin torch float32 / bfloat16 (bf16 only
   where the CPU has it), transformers `generate` float32 on the same GGUF dequantized, and
   hanlin torch float32 decoding 8 sequences at once (aggregate tokens/s over the whole
   batch call, prefill included: a conservative figure). Targets: torch float32 >= 2x
   transformers, batch-8 aggregate >= 4x torch float32 single. Where an NVIDIA GPU is at
   hand, the same rows in bfloat16 on CUDA (torch, transformers, torch batch of 8), with the
   GPU's peak allocated memory. `--folder onnx_int4=PATH` adds a row for an exported folder
   (ONNX or OpenVINO, run by its own engine) and its ratio to the llama_cpp row (target >= 1);
   `--small-pages onnx_int4` runs that folder again with HANLIN_HUGE_PAGES=0 (4 KiB pages
   under its weights, backends/hugepages.py) and prints the huge pages' gain.

All rows decode greedily with repeat_penalty 1.0, so they produce the same kind of work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the sea, the town and the people."
BATCH_PROMPTS = [
    PROMPT,
    "Explain how a steam engine works, step by step, in detail.",
    "Describe a walk through a busy market in a large city.",
    "Write a letter to a friend about a summer spent by a lake.",
    "Tell the history of the printing press and its effects.",
    "Describe the life cycle of a star, from cloud to remnant.",
    "Write a travel guide for a small mountain village.",
    "Explain what makes bread rise, and how bakers control it.",
]
ROWS = ["llama_cpp", "torch_float32", "torch_bfloat16", "transformers_float32", "torch_float32_batch8",
        "torch_cuda_bfloat16", "transformers_cuda_bfloat16", "torch_cuda_bfloat16_batch8"]  # fmt: skip
SMALL = "_small_pages"  # a --small-pages row: the same folder with HANLIN_HUGE_PAGES=0
CUDA_ROWS = [r for r in ROWS if "_cuda_" in r]  # run where an NVIDIA GPU is at hand, reported as skipped elsewhere


def peak_rss_mb() -> float:
    from hanlin.devices.tools import peak_rss_bytes

    return peak_rss_bytes() / 2**20


# --------------------------------------------------------------------------------------
# part 1: SDK overhead, in process
# --------------------------------------------------------------------------------------


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


def sdk_overhead(model: str, tokens: int, runs: int, threads: int | None, ctx: int) -> dict:
    import llama_cpp

    import hanlin

    llm = hanlin.load(model, device="cpu", engine="gguf", ctx_size=ctx, threads=threads, pull_missing=True)
    threads = llm.engine.threads
    raw = llama_cpp.Llama(model_path=llm.model.path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    ids = llm.chat_ids([{"role": "user", "content": PROMPT}])
    raw_run(raw, ids, 8)  # warm-up: page in the weights, allocate buffers
    hanlin_run(llm, ids, 8)
    raw_rates, hl_rates, raw_ttft, hl_ttft = [], [], [], []
    same, n_tokens = True, None
    for _ in range(runs):
        t, r, raw_ids = raw_run(raw, ids, tokens)
        raw_ttft.append(t)
        raw_rates.append(r)
        t, r, hl_ids = hanlin_run(llm, ids, tokens)
        hl_ttft.append(t)
        hl_rates.append(r)
        same = same and raw_ids == hl_ids
        n_tokens = len(hl_ids)
    raw_med, hl_med = statistics.median(raw_rates), statistics.median(hl_rates)
    out = {
        "model_path": llm.model.path, "threads": threads, "prompt_tokens": len(ids), "generated_tokens": n_tokens,
        "runs": runs, "hanlin_tok_s": round(hl_med, 2), "raw_llama_cpp_tok_s": round(raw_med, 2),
        "ratio": round(hl_med / raw_med, 4), "target_ratio": 0.95, "meets_target": hl_med / raw_med >= 0.95,
        "same_tokens": same, "hanlin_ttft_s": round(statistics.median(hl_ttft), 4),
        "raw_ttft_s": round(statistics.median(raw_ttft), 4),
        "hanlin_tok_s_all": [round(x, 2) for x in hl_rates], "raw_tok_s_all": [round(x, 2) for x in raw_rates],
        "llama_cpp_python": llama_cpp.__version__,
    }  # fmt: skip
    raw.close()
    llm.close()
    return out


# --------------------------------------------------------------------------------------
# part 2: one row per child process
# --------------------------------------------------------------------------------------


def run_row(row: str, model: str, tokens: int, runs: int, ctx: int, folder: str | None = None) -> dict:
    import hanlin

    device = "cuda" if "_cuda_" in row else "cpu"
    if row.startswith("transformers_"):
        return transformers_row(model, tokens, runs, device)
    engine = "gguf" if row == "llama_cpp" else "torch"
    opts = {} if engine == "gguf" else {"dtype": "bfloat16" if "bfloat16" in row else "float32"}
    if folder:  # an exported model (hanlin export --to onnx/openvino): its own engine, chosen as `hanlin chat` would
        model, engine, opts = folder, "auto", {}
    t0 = time.perf_counter()
    llm = hanlin.load(model, device=device, engine=engine, ctx_size=ctx, pull_missing=True, **opts)
    load_s = time.perf_counter() - t0
    if row.endswith("batch8"):
        return batch_row(llm, tokens, runs, load_s)
    ids = llm.chat_ids([{"role": "user", "content": PROMPT}])
    hanlin_run(llm, ids, 8)
    rates, n = [], 0
    for _ in range(runs):
        _, r, out = hanlin_run(llm, ids, tokens)
        rates.append(r)
        n = len(out)
    return {"tok_s": round(statistics.median(rates), 2), "generated_tokens": n, "load_s": round(load_s, 2)}


def batch_row(llm, tokens: int, runs: int, load_s: float) -> dict:
    from hanlin.backends.base import GenerationConfig

    prompts = [llm.chat_ids([{"role": "user", "content": p}]) for p in BATCH_PROMPTS]
    cfg = GenerationConfig(temperature=0, repeat_penalty=1.0, max_tokens=tokens)
    run = lambda n: llm.engine.generate_batch(prompts, cfg.updated(max_tokens=n), eos=False)  # noqa: E731
    run(8)
    rates, n = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        outs = run(tokens)  # EOS ignored: a fixed amount of work
        n = sum(len(o) for o in outs)
        rates.append(n / (time.perf_counter() - t0))
    return {"tok_s": round(statistics.median(rates), 2), "generated_tokens": n, "sequences": len(prompts), "load_s": round(load_s, 2),
            "note": "aggregate over 8 sequences, prefill included"}  # fmt: skip


def transformers_row(model: str, tokens: int, runs: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hanlin

    path = hanlin.resolve(model).path
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval().to(device)
    load_s = time.perf_counter() - t0
    llm = hanlin.load(path, device="cpu", engine="gguf")
    ids = torch.tensor([llm.chat_ids([{"role": "user", "content": PROMPT}])], device=device)
    llm.close()
    kw = dict(do_sample=False, repetition_penalty=1.0, pad_token_id=0)

    def timed(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(8)
    rates = []
    for _ in range(runs):
        first = timed(1)  # prefill + one token
        total = timed(tokens)
        rates.append((tokens - 1) / (total - first))
    return {"tok_s": round(statistics.median(rates), 2), "generated_tokens": tokens, "load_s": round(load_s, 2),
            "note": "decode rate = (n-1) / (time(n tokens) - time(1 token))"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}, or 'none'")
    ap.add_argument("--folder", action="append", default=[], metavar="ROW=PATH",
                    help="an extra row: an exported model folder (e.g. onnx_int4=smol-onnx-int4), run by its own engine; repeatable")
    ap.add_argument("--small-pages", action="append", default=[], metavar="ROW",
                    help="also run the --folder row ROW with HANLIN_HUGE_PAGES=0 (as row ROW_small_pages): the huge-pages gain, same run")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args(argv)
    folders = dict(f.split("=", 1) for f in args.folder if "=" in f)
    if len(folders) != len(args.folder):
        ap.error("--folder takes ROW=PATH, e.g. onnx_int4=smol-onnx-int4")
    for row in args.small_pages:
        if row not in folders:
            ap.error(f"--small-pages {row}: no --folder {row}=PATH row to run again")
        if not row.endswith(SMALL):
            folders[row + SMALL] = folders[row]
            args.folder.append(f"{row + SMALL}={folders[row]}")

    if args.row:
        out = run_row(args.row, args.model, args.tokens, args.runs, args.ctx_size, folders.get(args.row))
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if "_cuda_" in args.row:
            import torch

            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(json.dumps(out))
        return 0

    result = {
        "benchmark": "decode_tokens_per_second",
        "model": args.model,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "greedy_tokens": args.tokens,
        "sdk_overhead": sdk_overhead(args.model, args.tokens, args.runs, args.threads, args.ctx_size),
        "rows": {},
    }
    rows = [] if args.rows == "none" else [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        if row not in ROWS:
            ap.error(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    rows += list(folders)
    if "torch_bfloat16" in rows:
        from hanlin.devices import get_device

        if "bfloat16" not in get_device("cpu").dtypes:
            result["rows"]["torch_bfloat16"] = {"skipped": "this CPU has no bfloat16 support"}
            rows.remove("torch_bfloat16")
    if any(r in rows for r in CUDA_ROWS):
        from hanlin.devices import detect

        report = detect()
        if not any(d.kind == "cuda" for d in report.devices):
            for r in [r for r in rows if r in CUDA_ROWS]:
                result["rows"][r] = {"skipped": f"no NVIDIA GPU: {report.notes.get('cuda', 'none found')}"}
                rows.remove(r)
    # Rows take turns, one run each per round, so drift in machine load hits every row alike.
    samples: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(args.runs):
        for row in rows:
            cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--model", args.model, "--tokens", str(args.tokens),
                   "--runs", "1", "--ctx-size", str(args.ctx_size)] + [f"--folder={f}" for f in args.folder]  # fmt: skip
            env = dict(os.environ, HANLIN_HUGE_PAGES="0") if row.endswith(SMALL) else None
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                samples[row].append({"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"})
            else:
                samples[row].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for row, runs in samples.items():
        ok = [x for x in runs if "tok_s" in x]
        if not ok:
            result["rows"][row] = runs[-1]
            continue
        out = dict(ok[-1])
        out["tok_s"] = round(statistics.median(x["tok_s"] for x in ok), 2)
        out["tok_s_all"] = [x["tok_s"] for x in ok]
        out["peak_rss_mb"] = max(x["peak_rss_mb"] for x in ok)
        if "peak_gpu_mb" in out:
            out["peak_gpu_mb"] = max(x["peak_gpu_mb"] for x in ok)
        result["rows"][row] = out
    r = result["rows"]

    def rate(name: str) -> float | None:
        return r.get(name, {}).get("tok_s")

    if rate("torch_float32") and rate("transformers_float32"):
        x = rate("torch_float32") / rate("transformers_float32")
        result["torch_float32_vs_transformers"] = {"ratio": round(x, 3), "target": 2.0, "meets_target": x >= 2.0}
    if rate("torch_float32") and rate("torch_float32_batch8"):
        x = rate("torch_float32_batch8") / rate("torch_float32")
        result["batch8_vs_single"] = {"ratio": round(x, 3), "target": 4.0, "meets_target": x >= 4.0}
    for name in folders:  # issue 5's target: an exported CPU model at least as fast as llama.cpp on the original file
        if rate(name) and rate("llama_cpp"):
            x = rate(name) / rate("llama_cpp")
            result[f"{name}_vs_llama_cpp"] = {"ratio": round(x, 3), "target": 1.0, "meets_target": x >= 1.0}
        if name.endswith(SMALL) and rate(name) and rate(name[: -len(SMALL)]):
            result[f"{name[: -len(SMALL)]}_huge_pages_gain"] = round(rate(name[: -len(SMALL)]) / rate(name), 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
