"""LoRA fine-tuning speed and memory: hanlin against transformers Trainer + peft, in one run.

    python tools/bench_finetune.py [--steps 6] [--rows hf,hanlin] [--runs 1] [--grad-checkpoint off|on|both]
                                   [--n-rows 64] [--seq-len 256] [--batch 4] [--model NAME_OR_GGUF] [--data FILE] [--out FILE]

Both rows train the same model (the default SmolLM2-135M-Instruct GGUF, which transformers
loads dequantized to float32) on the same data (the first --n-rows GSM8K train rows, written
once as alpaca rows {"instruction", "output"} to a temporary JSONL that both rows read) with
the same settings: LoRA r=8, alpha=16, no dropout, on q_proj and v_proj; micro-batch 4 of at
most 256 tokens, no accumulation; AdamW lr 2e-4, cosine schedule, no warm-up; loss only on the
assistant's tokens; seed 0.

Precision is each row's own default, and a row of each in the other precision is there to
compare (--rows hf,hanlin,hf-bf16,hanlin-fp32):
- "hf": float32, the plain recipe; "hf-bf16": the same with TrainingArguments(bf16=True)
  (torch.autocast to bfloat16 over float32 weights, Trainer's mixed precision on a CPU);
- "hanlin": dtype "auto", which on a CPU with native bfloat16 (AVX512-BF16 here) keeps the
  frozen base in bfloat16 and the adapters, optimizer and loss in float32;
  "hanlin-fp32": dtype float32 throughout.
The allocator is each row's own default too: "hanlin" runs under mimalloc where
cmeel-mimalloc is installed, as `hanlin finetune` does (sdk/finetune/allocator.py), the hf rows
under glibc, as a plain python process does; "hanlin-glibc" and "hf-mimalloc" swap them.
The target compares the two defaults, "hanlin" against "hf".

- "hf": the plain recipe a user writes: the tokenizer's chat template, truncation to
  --seq-len, labels masked to -100 over the prompt, DataCollatorForSeq2Seq padding each batch
  to its longest row, peft.get_peft_model, transformers.Trainer.
- "hanlin": hanlin.finetune.trainer.train(FinetuneConfig(...)) with the same settings (hanlin
  packs rows into --seq-len sequences, so its batches carry fewer pad tokens).

Each row runs in its own child process, so its peak RSS (VmHWM, model loading
included) is its own; with --runs > 1 the rows take turns, so machine drift hits them alike.
The first optimizer step is a warm-up and is not timed: s/step is the wall time of steps
2..S (from the end of step 1 to the end of step S, data loading included) over S-1, and
tokens/s counts the real (non-pad) tokens of those steps. The figures are medians over runs,
the peak RSS the largest. Target (the issue): hanlin >= 1.5x the tokens/s of the hf row at
<= 0.6x its peak RSS.

Progress goes to stderr; one JSON object to stdout (and to --out FILE).
"""

from __future__ import annotations

import argparse
import contextlib
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
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "gsm8k", "train.jsonl")
ROWS = ("hf", "hanlin", "hf-bf16", "hanlin-fp32", "hanlin-glibc", "hf-mimalloc")
DEFAULT_ROWS = ("hf", "hanlin")
GC_SETTINGS = {"off": [False], "on": [True], "both": [False, True]}
LORA = dict(r=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
LR, SEED = 2e-4, 0
TARGET = {"tokens_per_s": 1.5, "peak_rss": 0.6}


def log(msg: str) -> None:
    print(f"[bench_finetune] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    from hanlin.devices.tools import peak_rss_bytes

    return peak_rss_bytes()


def gb(n: float) -> float:
    return round(n / 1e9, 3)


# --------------------------------------------------------------------------------------
# data: the first N rows of a GSM8K-style file as alpaca rows, one file both rows read
# --------------------------------------------------------------------------------------


def write_alpaca(src: str, n: int, dst: str) -> int:
    """Convert the first n rows of src ({"question","answer"} or {"instruction","output"}) to
    alpaca rows in dst. Returns how many were written; errors name the file and line."""
    rows = []
    with open(src, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(rows) == n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}:{lineno}: not JSON ({e})") from None
            if "question" in row and "answer" in row:
                rows.append({"instruction": row["question"], "output": row["answer"]})
            elif "instruction" in row and "output" in row:
                rows.append({"instruction": row["instruction"], "output": row["output"]})
            else:
                raise ValueError(f"{src}:{lineno}: a row needs question/answer (GSM8K) or instruction/output (alpaca), got {sorted(row)}")
    if len(rows) < n:
        raise ValueError(f"--n-rows {n}: {src} has only {len(rows)} rows")
    with open(dst, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def read_alpaca(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def timed_figures(step_times: list[float], step_tokens: list[int], step_labels: list[int] | None = None) -> dict:
    """s/step and tokens/s over steps 2..S (step 1 is the warm-up; with one step, that step)."""
    skip = 1 if len(step_times) > 1 else 0
    t, toks = step_times[skip:], step_tokens[skip:]
    total = sum(t)
    out = {
        "s_per_step": round(total / len(t), 4),
        "tokens_per_s": round(sum(toks) / total, 2),
        "timed_steps": len(t),
        "warmup_skipped": bool(skip),
        "tokens_per_step": round(sum(toks) / len(toks), 1),
        "step_times_s": [round(x, 4) for x in step_times],
    }
    if step_labels is not None:
        out["labelled_tokens_per_step"] = round(sum(step_labels[skip:]) / len(t), 1)
    return out


# --------------------------------------------------------------------------------------
# the rows, each run in its own child process
# --------------------------------------------------------------------------------------


def gguf_to_hf_folder(gguf: str, dst: str) -> str:
    """The GGUF as a float32 HF folder, written once for every hf run. transformers loads a GGUF
    dequantized to float32 but marks the model as GGUF-quantized, and then Trainer refuses to
    train it and save_pretrained refuses to save it; the weights are plain float32, so the mark
    is dropped and the folder saved, as a user would do once before fine-tuning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    del model
    return dst


def hf_row(model_path: str, data: str, steps: int, seq_len: int, batch: int, grad_checkpoint: bool, bf16: bool = False) -> dict:
    """transformers Trainer + peft: the plain recipe a user would write."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    transformers.set_seed(SEED)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_path)  # a float32 HF folder (gguf_to_hf_folder made it from the GGUF)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_bytes()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def encode(row: dict) -> dict:
        user = [{"role": "user", "content": row["instruction"]}]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": row["output"]}], tokenize=False)
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        ids = tok(full, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    train_set = [encode(r) for r in read_alpaca(data)]
    no_labels = sum(1 for r in train_set if all(x == -100 for x in r["labels"]))

    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=list(LORA["targets"]), task_type="CAUSAL_LM"))  # fmt: skip
    collate = DataCollatorForSeq2Seq(tok, padding="longest")
    batches: list[tuple[int, int, int]] = []  # per collated batch: real tokens, labelled tokens, padded tokens

    def counting_collator(features):
        out = collate(features)
        batches.append((int(out["attention_mask"].sum()), int((out["labels"] != -100).sum()), int(out["input_ids"].numel())))
        return out

    ends: list[float] = []
    begins: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            log(f"hf step {state.global_step}/{steps}: {ends[-1] - begins[-1]:.2f} s")

    out_dir = tempfile.mkdtemp(prefix="bench_ft_hf_")  # nothing is saved there (save_strategy "no"); removed after
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, gradient_checkpointing=grad_checkpoint, seed=SEED,
        data_seed=SEED, disable_tqdm=True, bf16=bf16,
    )  # fmt: skip
    try:
        trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=counting_collator, callbacks=[StepTimer()])
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its log lines: stdout carries only our JSON
            trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if len(ends) != steps or len(batches) < steps:
        raise RuntimeError(f"hf row: expected {steps} steps, saw {len(ends)} step ends and {len(batches)} batches")
    # step k's wall time: from the end of step k-1 to the end of step k (data loading and logging included)
    step_times = [ends[0] - begins[0]] + [ends[k] - ends[k - 1] for k in range(1, steps)]
    used = batches[:steps]
    out = timed_figures(step_times, [b[0] for b in used], [b[1] for b in used])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = slice(1 if steps > 1 else 0, steps)
    out.update(
        padded_tokens_per_step=round(statistics.mean(b[2] for b in used[timed]), 1),
        compute_s_per_step=round(statistics.mean([e - b for b, e in zip(begins, ends)][timed]), 4),  # step_begin..step_end only
        losses=[round(x, 4) for x in losses], rows_without_labels=no_labels, load_s=round(load_s, 2),
        peak_rss_after_load_gb=gb(rss_after_load), versions={"transformers": transformers.__version__, "peft": _version("peft")},
    )  # fmt: skip
    return out


def hanlin_row(model_path: str, data: str, steps: int, seq_len: int, batch: int, grad_checkpoint: bool, dtype: str = "auto") -> dict:
    """hanlin.finetune.trainer.train on the same file and settings. The result it returns must
    carry step_times (seconds per optimizer step, each from the end of the step before),
    step_tokens (real, non-pad tokens per step) and peak_rss (bytes)."""
    try:
        from hanlin.finetune import FinetuneConfig
        from hanlin.finetune.trainer import train
    except ImportError as e:
        return {"error": f"hanlin's trainer is not importable yet: {e}"}
    out_dir = tempfile.mkdtemp(prefix="bench_ft_hanlin_")
    cfg = FinetuneConfig(
        model=model_path, data=data, out=out_dir, method="lora", seq_len=seq_len, micro_batch=batch, grad_accum=1,
        max_steps=steps, lr=LR, schedule="cosine", warmup=0, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"], lora_targets=LORA["targets"], val_fraction=0.0, grad_checkpoint=grad_checkpoint, seed=SEED, dtype=dtype,
        release_memory=os.environ.get("HANLIN_KEEP_FREED_MEMORY") != "1",  # the trainer's allocator setting (README: Fine-tune)
    )  # fmt: skip
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = train(cfg)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    missing = [f for f in ("step_times", "step_tokens") if not hasattr(result, f)]
    if missing:
        return {"error": f"train() returned a {type(result).__name__} without {', '.join(missing)}: the benchmark needs "
                         "result.step_times (s per optimizer step), result.step_tokens (real tokens per step), result.peak_rss (bytes)"}  # fmt: skip
    step_times, step_tokens = list(result.step_times), list(result.step_tokens)
    if len(step_times) != steps or len(step_tokens) != steps:
        return {"error": f"train() ran {len(step_times)} timed steps and {len(step_tokens)} token counts, expected {steps} of each"}
    out = timed_figures(step_times, step_tokens)
    if getattr(result, "peak_rss", None) is not None:
        out["trainer_peak_rss_gb"] = gb(result.peak_rss)
    return out


def row_env(row: str) -> dict[str, str]:
    """A row's process environment: its allocator (see the module docstring)."""
    from hanlin.finetune.allocator import child_env

    if row in ("hanlin", "hanlin-fp32"):
        return child_env("auto")
    return child_env("mimalloc" if row == "hf-mimalloc" else "glibc")


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def child(args: argparse.Namespace) -> int:
    """Run one row, once, in this process; print its JSON as the last line of stdout."""
    gc = args.grad_checkpoint == "on"
    common = (args.model, args.data, args.steps, args.seq_len, args.batch, gc)
    try:
        if args.row.startswith("hf"):
            out = hf_row(*common, bf16=args.row == "hf-bf16")
        else:
            out = hanlin_row(*common, dtype="float32" if args.row == "hanlin-fp32" else "auto")
    except Exception as e:  # one row failing is a result of the benchmark, not the end of it
        import traceback

        traceback.print_exc(file=sys.stderr)
        out = {"error": f"{type(e).__name__}: {e}"}
    from hanlin.finetune.allocator import active

    out = {"row": args.row, "grad_checkpoint": gc, **out, "peak_rss_gb": gb(peak_rss_bytes()), "allocator": active()}
    print(json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# the parent: check the arguments, write the data, run the rows in turn, report
# --------------------------------------------------------------------------------------


def positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=positive("--steps"), default=6, help="optimizer steps per run; the first is an untimed warm-up (default 6)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated subset of {','.join(ROWS)} (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--runs", type=positive("--runs"), default=1, help="runs of each row, taking turns (default 1)")
    ap.add_argument("--grad-checkpoint", choices=sorted(GC_SETTINGS), default="off", help="gradient checkpointing in both rows (default off)")
    ap.add_argument("--n-rows", type=positive("--n-rows"), default=64, help="data rows from the start of --data (default 64)")
    ap.add_argument("--seq-len", type=positive("--seq-len", 16), default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--batch", type=positive("--batch"), default=4, help="sequences per step (default 4)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or .gguf file (default the default model)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="JSONL of question/answer or instruction/output rows (default GSM8K train)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        ap.error(f"--rows: unknown row {bad[0]!r}; choose from {', '.join(ROWS)}" if bad else f"--rows: name at least one of {', '.join(ROWS)}")
    args.rows = list(dict.fromkeys(rows))
    if args.row and args.grad_checkpoint == "both":
        ap.error("--row runs one setting: --grad-checkpoint off or on")
    return ap, args


def summarize(row: str, gc: bool, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"row": row, "grad_checkpoint": gc, "error": runs[-1].get("error", "no run finished"), "runs": runs}
    out = {
        "row": row, "grad_checkpoint": gc,
        "s_per_step": round(statistics.median(r["s_per_step"] for r in ok), 4),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in ok), 2),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in ok),
        "runs": runs,
    }  # fmt: skip
    if len(ok) < len(runs):
        out["failed_runs"] = len(runs) - len(ok)
    return out


def ratios(hf: dict | None, hl: dict | None) -> dict | None:
    if not hf or not hl or "error" in hf or "error" in hl:
        return None
    tps = hl["tokens_per_s"] / hf["tokens_per_s"]
    rss = hl["peak_rss_gb"] / hf["peak_rss_gb"]
    return {"tokens_per_s": round(tps, 3), "peak_rss": round(rss, 3),
            "meets_target": tps >= TARGET["tokens_per_s"] and rss <= TARGET["peak_rss"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.row:
        return child(args)

    import hanlin

    try:
        model_path = hanlin.resolve(args.model).path
    except Exception as e:
        ap.error(f"--model {args.model!r}: {e}")
    if not os.path.isfile(args.data):
        ap.error(f"--data {args.data!r}: no such file (expected a JSONL of GSM8K question/answer or alpaca instruction/output rows)")
    tmp = tempfile.mkdtemp(prefix="bench_ft_data_")
    try:
        data = os.path.join(tmp, "train_alpaca.jsonl")
        try:
            n = write_alpaca(args.data, args.n_rows, data)
        except ValueError as e:
            ap.error(str(e))
        hf_model = model_path
        if any(r.startswith("hf") for r in args.rows) and not os.path.isdir(model_path):
            log(f"converting {os.path.basename(model_path)} to a float32 HF folder for the hf row (once, not timed)")
            hf_model = gguf_to_hf_folder(model_path, os.path.join(tmp, "hf_model"))
        settings = GC_SETTINGS[args.grad_checkpoint]
        samples: dict[tuple[str, bool], list[dict]] = {(r, gc): [] for gc in settings for r in args.rows}
        for run in range(args.runs):  # rows take turns, one run each per round
            for gc in settings:
                for row in args.rows:
                    log(f"run {run + 1}/{args.runs}: row {row}, grad_checkpoint {'on' if gc else 'off'}, {args.steps} steps")
                    cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--model", hf_model if row.startswith("hf") else model_path, "--data", data,
                           "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                           "--grad-checkpoint", "on" if gc else "off"]  # fmt: skip
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=row_env(row))  # stderr passes through: live progress
                    lines = proc.stdout.strip().splitlines()
                    try:
                        res = json.loads(lines[-1])
                    except (IndexError, json.JSONDecodeError):
                        res = {"row": row, "grad_checkpoint": gc, "error": f"the child exited {proc.returncode} without a result"}
                    res["wall_s"] = round(time.perf_counter() - t0, 2)
                    log(f"  -> {json.dumps({k: res.get(k) for k in ('s_per_step', 'tokens_per_s', 'peak_rss_gb', 'error') if k in res})}")
                    samples[(row, gc)].append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import torch

    result = {
        "bench": "finetune",
        "settings": {
            "model": model_path, "hf_model": "the same weights as a float32 HF folder" if hf_model != model_path else model_path, "data": args.data, "n_rows": n, "steps": args.steps, "timed_steps": max(args.steps - 1, 1),
            "seq_len": args.seq_len, "batch": args.batch, "grad_accum": 1, "runs": args.runs, "lr": LR, "schedule": "cosine",
            "warmup": 0, "seed": SEED, "lora": {**LORA, "targets": list(LORA["targets"])}, "dtype": {"hf": "float32", "hf-bf16": "bfloat16 autocast over float32 weights", "hanlin": "auto (bfloat16 base where the CPU has it)", "hanlin-fp32": "float32", "hanlin-glibc": "as hanlin", "hf-mimalloc": "as hf"}, "device": "cpu",
            "grad_checkpoint": args.grad_checkpoint, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "timing": "s/step: wall time of steps 2..S (end of step 1 to end of step S) / (S-1); tokens/s: real (non-pad) tokens of those steps / that time; peak RSS: the row's own child process, model loading included",
        },
        "rows": [summarize(row, gc, runs) for (row, gc), runs in samples.items()],
        "target": {"tokens_per_s": f">= {TARGET['tokens_per_s']}", "peak_rss": f"<= {TARGET['peak_rss']}"},
    }  # fmt: skip
    by = {(r["row"], r["grad_checkpoint"]): r for r in result["rows"]}
    per_setting = {("on" if gc else "off"): ratios(by.get(("hf", gc)), by.get(("hanlin", gc))) for gc in settings}
    result["ratios"] = per_setting[args.grad_checkpoint] if len(settings) == 1 else per_setting
    # context for the target: each row against the other library in the same precision
    pairs = {"hanlin-fp32 / hf (both float32)": ("hf", "hanlin-fp32"), "hanlin / hf-bf16 (both bfloat16)": ("hf-bf16", "hanlin"),
             "hanlin-glibc / hf (both glibc)": ("hf", "hanlin-glibc"), "hanlin / hf-mimalloc (both mimalloc)": ("hf-mimalloc", "hanlin")}
    same = {name: {("on" if gc else "off"): ratios(by.get((a, gc)), by.get((b, gc))) for gc in settings}
            for name, (a, b) in pairs.items() if a in args.rows and b in args.rows}  # fmt: skip
    if same:
        result["same_precision_ratios"] = same
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
