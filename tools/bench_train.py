"""`hanlin train` throughput: tokens/s on 1 and 2 processes and the scaling efficiency (CPU, the
default), or tokens/s and MFU of a ~1B-parameter model in bfloat16 on one NVIDIA GPU (--gpu).

    python tools/bench_train.py [--shards DIR] [--steps 30] [--warmup 4] [--strategy ddp[,zero2,fsdp2]]
                                [--global-batch 8] [--micro-batch 4] [--seq-len 256] [--arch JSON] [--out FILE]
    python tools/bench_train.py --gpu [--shards DIR] [--steps 30] [--warmup 5] [--n-layers 20]
                                [--grad-checkpointing] [--micro-batch 4] [--global-batch 16] [--seq-len 2048]

Every row is a real `hanlin train --config C.yaml [--nproc N]` run (the CLI, its launcher and
its log.jsonl), on shards made once by `hanlin data prepare` from WikiText-2's articles
(../shared/datasets/wikitext2/test.txt, split at its top-level ` = Title = ` headings), or on
the folder --shards names. Nothing but the process layout changes between the CPU rows: the
same model (model.arch = TINY_ARCH, ~12M parameters with the default 49,152-token
vocabulary), float32, seq_len 256, the same global batch of sequences per optimizer step and
the same micro-batch per forward (one process accumulates global / micro micro-batches, two
processes half as many each), the same data order (trainer.py makes it a function of the step
only, so the rows also report how far their losses drift apart), no evaluation, no
checkpoint but the final one, TensorBoard off.

What a "device" is on a CPU: one core. A data-parallel job gives every rank its own device;
on a GPU box that is one GPU per process, here it is one core per process, pinned by
OMP_NUM_THREADS=1 (torch's intra-op pool then has one thread). torchrun sets
OMP_NUM_THREADS=1 itself for nproc > 1, and torch would otherwise give a single process one
thread per core, so the bench sets it explicitly for every row; that way the 1-process row
and the 2-process row use one core per process and the only difference is the number of
processes. The rows:

- 1proc_1thread:   1 process x 1 thread: one device, the baseline of the scaling efficiency
- 2proc_<strategy>_1thread: 2 processes x 1 thread (gloo collectives), for each --strategy
- 1proc_2threads:  1 process x 2 threads: the same two cores used by torch's intra-op
                   parallelism instead of data parallelism (the alternative on one machine)

scaling_efficiency[s] = tokens/s(2 processes, s) / (2 x tokens/s(1 process, 1 thread)),
intra_op_efficiency = tokens/s(1 process, 2 threads) / (2 x tokens/s(1 process, 1 thread)).
The machine has two cores, so the 2-process and 2-thread rows use all of it: an efficiency
below 1 there includes whatever else the machine is doing. Run nothing else alongside.

tokens/s: the first --warmup optimizer steps (allocator, gloo buffers, page cache) are left
out; over the remaining steps, tokens/s = tokens / sum of the step times, where each step time
comes from its log row (tokens_per_s_per_device, logged every step, over the world size); the
median and spread of the per-step figures are printed too. All figures are totals over the
processes of the row.

--gpu: one process on cuda:0, a llama-shaped ~1.0B-parameter model (dim 2048, 20 layers, 16
heads, 4 KV heads (GQA), SwiGLU hidden 5632, tied embeddings, the shards' vocabulary),
bfloat16 autocast (AdamW in float32), seq_len 2048, a few dozen steps; tokens/s and MFU
(metrics.py: 6N + attention FLOPs per token over the device's dense bf16 peak, known for
H100/H200/A100/...) from the log, after warm-up. The InternEvo and torchtitan figures printed
with it are theirs, as they report them, not measured here.

Progress goes to stderr; one JSON object to stdout (and to --out FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "wikitext2", "test.txt")
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp2")

# ~1.0B parameters with a 49,152-token vocabulary: 20 x 45.1M per block + 100.7M tied embeddings
GPU_ARCH = {"dim": 2048, "n_layers": 20, "n_heads": 16, "n_kv_heads": 4, "hidden_dim": 5632, "tie_embeddings": True}

# Reported by those projects, not measured here (different models, hardware and software stacks).
REFERENCES = {
    "internevo": {"figure": "about 4,000 tokens/s per GPU", "tokens_per_s_per_gpu": 4000, "model": "7B (InternLM-7B)",
                  "hardware": "NVIDIA A100", "source": "InternEvo README (training performance)"},
    "torchtitan": {"figure": "33-39% MFU", "mfu": [0.33, 0.39], "model": "Llama-3.1-8B", "hardware": "NVIDIA H100",
                   "source": "torchtitan paper / docs/performance.md (FSDP2, bf16, torch.compile, float8 off)"},
    "note": "as reported by InternEvo and torchtitan, not measured here; they train 7-8B models on other stacks: "
            "compare MFU rather than tokens/s",
}


def log(msg: str) -> None:
    print(f"bench_train: {msg}", file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------------


def prepare_shards(text: str, out: str) -> dict:
    """WikiText-2 raw text -> articles JSONL -> `hanlin data prepare` shards in `out`; its report."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pretrain_wikitext2 import split_articles

    os.makedirs(os.path.dirname(out), exist_ok=True)
    jsonl = out + ".articles.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for a in split_articles(text):
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
    r = subprocess.run([sys.executable, "-m", "hanlin.apps.cli", "data", "prepare", jsonl, out, "--json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_train: hanlin data prepare failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        return json.load(f)


# -- configs -----------------------------------------------------------------------------------


def cpu_config(shards: str, out: str, *, strategy: str, steps: int, global_batch: int, micro_batch: int, seq_len: int,
               arch: dict) -> dict:
    return {
        "out": out,
        "model": {"init": "scratch", "arch": arch},
        "data": {"train": shards, "seq_len": seq_len},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": steps, "global_batch": global_batch, "micro_batch": micro_batch, "seed": 0, "device": "cpu",
                  "dtype": "float32"},
        "parallel": {"strategy": strategy},
        "checkpoint": {"every": 0, "keep": 1},  # only the final one
        "eval": {"every": 0},
        "log": {"every": 1, "tensorboard": False},
    }


def gpu_config(shards: str, out: str, *, steps: int = 30, global_batch: int = 16, micro_batch: int = 4,
               seq_len: int = 2048, n_layers: int = GPU_ARCH["n_layers"], grad_checkpointing: bool = False) -> dict:
    return {
        "out": out,
        "model": {"init": "scratch", "arch": {**GPU_ARCH, "n_layers": n_layers}},
        "data": {"train": shards, "seq_len": seq_len},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 5},
        "train": {"steps": steps, "global_batch": global_batch, "micro_batch": micro_batch, "seed": 0, "device": "cuda",
                  "dtype": "bfloat16", "grad_checkpointing": grad_checkpointing},
        "parallel": {"strategy": "none"},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"every": 0},
        "log": {"every": 1, "tensorboard": False},
    }


# -- one row -----------------------------------------------------------------------------------


def run_row(name: str, cfg: dict, work: str, *, nproc: int, threads: int | None, warmup: int, timeout: float) -> dict:
    """One `hanlin train` run; its throughput figures from log.jsonl."""
    import yaml

    from hanlin.train.config import TrainConfig

    TrainConfig.from_dict(cfg).check(nproc)
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [sys.executable, "-m", "hanlin.apps.cli", "train", "--config", path] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = dict(os.environ)
    if threads:  # one "device" of a CPU row = this many cores per process
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log(f"{name}: {nproc} process(es) x {threads or 'default'} thread(s), {cfg['train']['steps']} steps")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench_train: row {name} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return {"processes": nproc, "threads_per_process": threads, "strategy": cfg["parallel"]["strategy"],
            **read_figures(os.path.join(cfg["out"], "log.jsonl"), nproc, cfg, warmup), "wall_s": round(wall, 1)}


def read_figures(log_path: str, world: int, cfg: dict, warmup: int) -> dict:
    from hanlin.train.metrics import read_log

    rows = [r for r in read_log(log_path) if r.get("kind") is None]
    timed = rows[warmup:] if len(rows) > warmup else rows[-1:]
    tokens_per_step = cfg["train"]["global_batch"] * cfg["data"]["seq_len"]
    per_step = [r["tokens_per_s_per_device"] * world for r in timed]  # this step's total tokens/s
    seconds = sum(tokens_per_step / t for t in per_step)
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "tokens_per_s": round(tokens_per_step * len(timed) / seconds, 1),
        "tokens_per_s_per_device": round(tokens_per_step * len(timed) / seconds / world, 1),
        "tokens_per_s_median": round(statistics.median(per_step), 1),
        "tokens_per_s_min_max": [round(min(per_step), 1), round(max(per_step), 1)],
        "s_per_step": round(seconds / len(timed), 3),
        "timed_steps": len(timed),
        "mfu": round(statistics.mean(mfu), 4) if mfu else None,
        "memory_gib_rank0": rows[-1]["memory_gib"],
        "losses": [r["loss"] for r in rows],
    }


# -- modes -------------------------------------------------------------------------------------


def cpu_mode(args, shards: str, work: str) -> dict:
    arch = json.loads(args.arch) if args.arch else None
    from hanlin.train.config import TINY_ARCH

    arch = {**TINY_ARCH, **(arch or {})}
    base = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch, seq_len=args.seq_len, arch=arch)
    rows: dict[str, dict] = {}

    def row(name, nproc, threads, strategy):
        cfg = cpu_config(shards, os.path.join(work, name), strategy=strategy, **base)
        rows[name] = run_row(name, cfg, work, nproc=nproc, threads=threads, warmup=args.warmup, timeout=args.timeout)
        log(f"{name}: {rows[name]['tokens_per_s']:,.0f} tokens/s")

    row("1proc_1thread", 1, 1, "none")
    for s in args.strategy:
        row(f"2proc_{s}_1thread", 2, 1, s)
    row("1proc_2threads", 1, 2, "none")

    one = rows["1proc_1thread"]["tokens_per_s"]
    ref_losses = rows["1proc_1thread"]["losses"]
    for r in rows.values():
        r["max_abs_loss_diff_vs_1proc"] = round(max(abs(a - b) for a, b in zip(r["losses"], ref_losses)), 6)
        r["final_loss"] = r.pop("losses")[-1]
    two_threads = rows["1proc_2threads"]["tokens_per_s"]
    return {
        "mode": "cpu",
        "device_meaning": "one CPU core per process (OMP_NUM_THREADS=1 in every data-parallel row)",
        "rows": rows,
        "scaling_efficiency": {s: round(rows[f"2proc_{s}_1thread"]["tokens_per_s"] / (2 * one), 3) for s in args.strategy},
        "speedup_2proc": {s: round(rows[f"2proc_{s}_1thread"]["tokens_per_s"] / one, 3) for s in args.strategy},
        "intra_op_efficiency": round(two_threads / (2 * one), 3),
        "data_parallel_vs_intra_op": {s: round(rows[f"2proc_{s}_1thread"]["tokens_per_s"] / two_threads, 3) for s in args.strategy},
        "settings": {"arch": arch, "dtype": "float32", "seq_len": args.seq_len, "global_batch": args.global_batch,
                     "micro_batch": args.micro_batch, "tokens_per_step": args.global_batch * args.seq_len,
                     "steps": args.steps, "warmup_steps_excluded": args.warmup, "strategies": args.strategy},
    }


def gpu_mode(args, shards: str, work: str) -> dict:
    cfg = gpu_config(shards, os.path.join(work, "gpu"), steps=args.steps, global_batch=args.global_batch,
                     micro_batch=args.micro_batch, seq_len=args.seq_len, n_layers=args.n_layers,
                     grad_checkpointing=args.grad_checkpointing)
    r = run_row("1gpu_bf16", cfg, work, nproc=1, threads=None, warmup=args.warmup, timeout=args.timeout)
    losses = r.pop("losses")
    r["first_loss"], r["final_loss"] = losses[0], losses[-1]
    return {
        "mode": "gpu",
        "parameters": count_parameters(cfg["model"]["arch"], vocab_size=read_vocab(shards)),
        "result": r,
        "references_not_measured": REFERENCES,
        "settings": {"arch": cfg["model"]["arch"], "dtype": "bfloat16 (autocast; float32 weights and AdamW)",
                     "seq_len": args.seq_len, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
                     "tokens_per_step": args.global_batch * args.seq_len, "steps": args.steps,
                     "warmup_steps_excluded": args.warmup, "grad_checkpointing": args.grad_checkpointing},
    }


def read_vocab(shards: str) -> int:
    with open(os.path.join(shards, "manifest.json"), encoding="utf-8") as f:
        return int(json.load(f)["vocab_size"])


def count_parameters(arch: dict, vocab_size: int, seq_len: int = 2048) -> int:
    """Parameters of the native Transformer of this shape, built on the meta device (no memory)."""
    import torch

    from hanlin.backends.torch.model import ModelConfig, Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=vocab_size, max_seq_len=max(seq_len, 2048), **arch))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied weights once


def no_gpu_reason() -> str | None:
    from hanlin.devices import detect

    report = detect()
    if any(d.kind == "cuda" for d in report.devices):
        return None
    return report.notes.get("cuda", "no CUDA device found")


# -- main --------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the ~1B bfloat16 run on cuda:0 instead of the CPU rows")
    ap.add_argument("--shards", help="a shard folder from `hanlin data prepare` (default: WikiText-2, prepared once here)")
    ap.add_argument("--text", default=WIKITEXT, help="WikiText-2 raw text to prepare when --shards is not given")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of the figures (default 4; --gpu 5)")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default 8; --gpu 16)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward per process")
    ap.add_argument("--seq-len", type=int, default=None, help="default 256; --gpu 2048")
    ap.add_argument("--strategy", default="ddp", help=f"2-process rows, comma-separated, of: {', '.join(STRATEGIES)}")
    ap.add_argument("--arch", help="CPU: model.arch fields as JSON, over TINY_ARCH (e.g. for a quick try)")
    ap.add_argument("--n-layers", type=int, default=GPU_ARCH["n_layers"], help="--gpu: blocks (20: ~1.0B parameters)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="--gpu: recompute activations in backward")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--keep", help="keep the run folders here (default: a temporary folder, removed)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    gpu = args.gpu
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 4)
    args.global_batch = args.global_batch if args.global_batch is not None else (16 if gpu else 8)
    args.seq_len = args.seq_len if args.seq_len is not None else (2048 if gpu else 256)
    args.strategy = [s.strip() for s in args.strategy.split(",") if s.strip()]
    bad = [s for s in args.strategy if s not in STRATEGIES]
    if bad or not args.strategy:
        ap.error(f"--strategy {bad[0] if bad else '(none)'!r}: name one or more of {', '.join(STRATEGIES)}")
    if args.steps < 1 or args.warmup < 0 or args.warmup >= args.steps:
        ap.error(f"need --steps >= 1 and 0 <= --warmup < --steps (got {args.steps}, {args.warmup})")
    if args.global_batch % (2 * args.micro_batch) and not gpu:
        ap.error(f"--global-batch {args.global_batch} must be a multiple of 2 x --micro-batch ({2 * args.micro_batch}) "
                 "so both the 1- and 2-process rows take whole micro-batches")
    if args.arch:
        try:
            if not isinstance(json.loads(args.arch), dict):
                raise ValueError
        except ValueError:
            ap.error(f"--arch takes a JSON object of model.arch fields, got {args.arch!r}")
    return ap, args


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.gpu:
        reason = no_gpu_reason()
        if reason:
            print(f"bench_train: --gpu needs an NVIDIA GPU (CUDA), and there is none here: {reason}. "
                  "Run without --gpu for the CPU rows.", file=sys.stderr)
            return 2
    if args.shards and not os.path.isfile(os.path.join(args.shards, "manifest.json")):
        ap.error(f"--shards {args.shards!r}: no manifest.json there (make one with `hanlin data prepare`)")
    if not args.shards and not os.path.isfile(args.text):
        ap.error(f"--text {args.text!r}: no such file (WikiText-2 test.txt), or pass --shards DIR")

    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="bench_train_")
    os.makedirs(work, exist_ok=True)
    try:
        data: dict = {"shards": os.path.abspath(args.shards) if args.shards else None}
        shards = args.shards
        if not shards:
            shards = os.path.join(work, "shards")
            if not os.path.isfile(os.path.join(shards, "manifest.json")):
                log(f"preparing shards from {args.text} (once, not timed)")
                report = prepare_shards(args.text, shards)
                data.update(prepared_from=os.path.abspath(args.text), kept=report["kept"], dropped=report["dropped"])
            data["shards"] = shards if args.keep else "(prepared in a temporary folder, removed)"
        with open(os.path.join(shards, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        data["train_tokens"] = sum(s["tokens"] for s in manifest["splits"]["train"]["shards"])
        data["vocab_size"] = manifest["vocab_size"]
        for name in os.listdir(work):  # --keep reused: the run folders start fresh
            if name != "shards" and os.path.isdir(os.path.join(work, name)):
                shutil.rmtree(os.path.join(work, name))
        result = gpu_mode(args, shards, work) if args.gpu else cpu_mode(args, shards, work)
        import torch

        result["data"] = data
        result["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                             "cpu_count": os.cpu_count(), "device": _device_label(args.gpu)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _device_label(gpu: bool) -> str:
    from hanlin.devices import detect

    report = detect()
    if gpu:
        return next(d.label() for d in report.devices if d.kind == "cuda")
    return report.cpu().label()


if __name__ == "__main__":
    sys.exit(main())
