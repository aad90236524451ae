"""Real pre-training signal: a ~10M-parameter model trained from scratch for a few minutes on
WikiText-2 text, through the whole pipeline, with its held-out perplexity falling well below
where it started.

    python tools/pretrain_wikitext2.py [--work DIR] [--steps 150] [--nproc 1]

1. split ../shared/datasets/wikitext2/test.txt into articles (a top-level heading is a line
   ` = Title = ` with one '=' on each side; ` = = Section = = ` lines are subsections and stay
   inside their article) -> WORK/articles.jsonl
2. `hanlin data prepare WORK/articles.jsonl WORK/shards --heldout 0.1` (the default model's
   tokenizer; the held-out split is chosen by a hash of each article's text)
3. a train config (model.arch = TINY_ARCH, ~10M parameters, seq_len 256, AdamW with warmup and
   cosine decay, held-out loss every `--eval-every` steps) -> `hanlin train`
4. the train and held-out loss curves and the held-out perplexity, drawn from WORK/run/log.jsonl
   into docs/img/pretrain_wikitext2.png, the figures into docs/img/pretrain_wikitext2.json
5. `hanlin chat --model WORK/run/final --prompt ...`: the saved model loads and generates (the chat
   template is the default tokenizer's, which a model pre-trained on plain articles never saw,
   so a raw-text continuation through `hanlin.load(...).generate` is printed as well)

The held-out perplexity is per token of the default tokenizer (49,152 tokens), over the
first eval.batches x micro_batch held-out windows of 256 tokens (the same text at every
evaluation). WikiText-2's test split is small (~0.3M tokens): 150 steps of 8 x 256 tokens are about
one epoch over the training articles, ~5 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(ROOT, "..", "shared", "datasets", "wikitext2", "test.txt")
TOP_HEADING = re.compile(r"^ = ([^=].*[^=]|[^=]) = $")  # ' = Title = ', not ' = = Section = = '


def split_articles(path: str) -> list[dict[str, str]]:
    """WikiText-2 raw text -> one {"title", "text"} per article (the title line starts it)."""
    articles: list[dict[str, str]] = []
    title, lines = None, []

    def flush():
        body = "\n".join(line.strip() for line in lines).strip()
        if title is not None and body:
            articles.append({"title": title, "text": f"{title}\n\n{body}"})

    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            m = TOP_HEADING.match(line)
            if m:
                flush()
                title, lines = m.group(1).strip(), []
            else:
                lines.append(line)
    flush()
    return articles


def hanlin(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hanlin.apps.cli", *args], text=True, **kw)


def write_config(path: str, *, out: str, shards: str, steps: int, lr: float, warmup: int, eval_every: int,
                 eval_batches: int, global_batch: int, micro_batch: int, threads_note: str) -> dict:
    import yaml

    from hanlin.train.config import TINY_ARCH, TrainConfig

    cfg = {
        "out": out,
        "model": {"init": "scratch", "arch": dict(TINY_ARCH)},
        "data": {"train": shards, "seq_len": 256},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": warmup, "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"steps": steps, "global_batch": global_batch, "micro_batch": micro_batch, "seed": 0, "device": "cpu",
                  "dtype": "float32"},
        "parallel": {"strategy": "auto"},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"every": eval_every, "batches": eval_batches},
        "log": {"every": 1, "tensorboard": False},
    }
    TrainConfig.from_dict(cfg).check()  # refuse a bad config here, not inside the run
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# written by tools/pretrain_wikitext2.py ({threads_note})\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    return cfg


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") is None]
    held = [r for r in rows if r.get("kind") == "heldout"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train (per step)")
    k = 10  # a moving average makes the trend readable
    if len(train) >= k:
        avg = [sum(r["loss"] for r in train[i - k + 1: i + 1]) / k for i in range(k - 1, len(train))]
        ax1.plot([r["step"] for r in train[k - 1:]], avg, lw=1.6, label=f"train ({k}-step mean)")
    ax1.plot([r["step"] for r in held], [r["loss"] for r in held], "o-", ms=3.5, lw=1.6, label="held-out")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("cross-entropy (nats / token)")
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot([r["step"] for r in held], [r["ppl"] for r in held], "o-", ms=3.5, color="C2")
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("perplexity (log scale)")
    ax2.set_title("held-out perplexity")
    ax2.grid(alpha=0.3, which="both")
    for r in (held[0], held[-1]):
        ax2.annotate(f"{r['ppl']:,.0f}", (r["step"], r["ppl"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chat_check(final: str, prompt: str, max_tokens: int, temperature: float) -> dict:
    t0 = time.perf_counter()
    opts = ["--device", "cpu", "--prompt", prompt, "--temperature", str(temperature), "--seed", "0",
            "--max-tokens", str(max_tokens), "--json"]
    r = hanlin("chat", "--model", final, *opts, capture_output=True, timeout=600)
    out = {"command": f"hanlin chat --model {final} " + " ".join(repr(o) if " " in o else o for o in opts),
           "returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode == 0:
        try:
            answer = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {"raw_stdout": r.stdout[-2000:]}
        out.update(loads=True, generates=answer.get("usage", {}).get("completion_tokens", 0) > 0, answer=answer)
    else:
        out.update(loads=False, generates=False, error=r.stderr[-3000:])
    return out


def continuation(final: str, prompt: str, max_tokens: int) -> dict:
    """Raw-text continuation (no chat template): what a pre-trained, not instruction-tuned, model does."""
    import hanlin

    llm = hanlin.load(final, device="cpu")
    out = {"api": f"hanlin.load({final!r}).generate({prompt!r}, temperature=0.8, seed=0, max_tokens={max_tokens})"}
    done = llm.generate(prompt, temperature=0.8, seed=0, max_tokens=max_tokens)
    return {**out, "text": done.text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hanlin-pretrain-wikitext2"),
                    help="working folder: articles, shards, the run (default: under the system temp folder)")
    ap.add_argument("--text", default=WIKITEXT, help="WikiText-2 raw text")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=6,
                    help="held-out micro-batches per evaluation (6 x 8 x 256 = 12,288 tokens: nearly all of the held-out split)")
    ap.add_argument("--nproc", type=int, default=1, help="training processes (ddp when > 1)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per process (default: cores / nproc)")
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img", "pretrain_wikitext2.png"))
    ap.add_argument("--prompt", default="The history of the city")
    ap.add_argument("--force", action="store_true", help="replace an existing WORK folder's shards and run")
    args = ap.parse_args(argv)

    work = os.path.abspath(args.work)
    if os.path.exists(os.path.join(work, "run")) and not args.force:
        print(f"{work}/run exists: pass --force or choose another --work", file=sys.stderr)
        return 2
    os.makedirs(work, exist_ok=True)

    # 1. articles
    articles = split_articles(args.text)
    jsonl = os.path.join(work, "articles.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for a in articles:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
    print(f"{len(articles)} articles from {args.text}", file=sys.stderr)

    # 2. shards
    shards = os.path.join(work, "shards")
    r = hanlin("data", "prepare", jsonl, shards, "--heldout", "0.1", "--json", "--force", capture_output=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    with open(os.path.join(shards, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    print(f"data prepare: kept {report['kept']} of {report['documents']}, dropped {report['dropped']}, "
          f"splits {report['splits']}", file=sys.stderr)

    # 3. train
    import shutil

    run_dir = os.path.join(work, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    config = os.path.join(work, "train.yaml")
    cfg = write_config(config, out=run_dir, shards=shards, steps=args.steps, lr=args.lr, warmup=args.warmup,
                       eval_every=args.eval_every, eval_batches=args.eval_batches, global_batch=args.global_batch,
                       micro_batch=args.micro_batch, threads_note=f"{args.nproc} process(es) x {threads} thread(s)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = ["train", "--config", config] + (["--nproc", str(args.nproc)] if args.nproc > 1 else [])
    t0 = time.perf_counter()
    r = hanlin(*cmd, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"hanlin train failed (exit {r.returncode})", file=sys.stderr)
        return r.returncode

    # 4. curves and figures
    from hanlin.train.metrics import read_log

    rows = read_log(os.path.join(run_dir, "log.jsonl"))
    train = [x for x in rows if x.get("kind") is None]
    held = [x for x in rows if x.get("kind") == "heldout"]
    best = min(held, key=lambda x: x["loss"])
    with open(os.path.join(run_dir, "final", "config.json"), encoding="utf-8") as f:
        model_config = json.load(f)
    params = _count_params(os.path.join(run_dir, "final"))
    tps = [x["tokens_per_s_per_device"] * args.nproc for x in train[5:]] or [0]
    figures = {
        "what": "TINY_ARCH trained from scratch on WikiText-2 test.txt articles (90% train / 10% held-out by text hash)",
        "parameters": params,
        "arch": cfg["model"]["arch"],
        "vocab_size": model_config.get("vocab_size"),
        "seq_len": cfg["data"]["seq_len"],
        "steps": cfg["train"]["steps"],
        "global_batch": cfg["train"]["global_batch"],
        "tokens_trained": train[-1]["tokens"],
        "train_split_tokens": report["splits"]["train"]["tokens"],
        "heldout_split_tokens": report["splits"].get("heldout", {}).get("tokens"),
        "epochs_over_train_split": round(train[-1]["tokens"] / report["splits"]["train"]["tokens"], 2),
        "heldout_tokens_per_eval": cfg["eval"]["batches"] * cfg["train"]["micro_batch"] * args.nproc * cfg["data"]["seq_len"],
        "optim": cfg["optim"],
        "processes": args.nproc,
        "threads_per_process": threads,
        "wall_seconds_train": round(wall, 1),
        "median_tokens_per_s": round(sorted(tps)[len(tps) // 2], 1),
        "train_loss_first": train[0]["loss"],
        "train_loss_last10_mean": round(sum(x["loss"] for x in train[-10:]) / len(train[-10:]), 4),
        "heldout_ppl_step0": held[0]["ppl"],
        "heldout_ppl_final": held[-1]["ppl"],
        "heldout_loss_step0": held[0]["loss"],
        "heldout_loss_final": held[-1]["loss"],
        "heldout_best": {"step": best["step"], "loss": best["loss"], "ppl": best["ppl"]},
        "uniform_ppl": model_config.get("vocab_size"),
        "heldout_curve": [[x["step"], x["ppl"]] for x in held],
        "data_report": {"articles": len(articles), "documents": report["documents"], "kept": report["kept"],
                        "dropped": report["dropped"], "splits": report["splits"]},
    }
    img = os.path.abspath(args.img)
    plot(rows, img, f"hanlin train: {params / 1e6:.1f}M params on WikiText-2 ({figures['tokens_trained']:,} tokens, "
                    f"{wall / 60:.1f} min, {args.nproc} process(es) x {threads} CPU thread(s)); held-out ppl "
                    f"{held[0]['ppl']:,.0f} -> {held[-1]['ppl']:,.0f}")

    # 5. the saved model loads and generates
    final = os.path.join(run_dir, "final")
    figures["chat"] = [chat_check(final, args.prompt, 40, t) for t in (0.0, 0.8)]  # greedy, then sampled
    figures["continuation"] = continuation(final, args.prompt, 60)
    out_json = os.path.splitext(img)[0] + ".json"
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    print(f"wrote {img} and {out_json}", file=sys.stderr)
    return 0


def _count_params(folder: str) -> int:
    """Parameters of the saved model (tied embeddings counted once)."""
    from safetensors import safe_open

    total, seen = 0, set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "np") as f:
                for key in f.keys():
                    if key not in seen:
                        seen.add(key)
                        total += math.prod(f.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    sys.exit(main())
