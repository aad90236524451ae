"""`hanlin finetune` on the real default model, on CPU: it learns a made-up fact that `hanlin chat`
then answers with the adapter, resumes after kill -9 on the same loss curve, DPO widens the
preference margin on held-out pairs, merge writes a folder that gives the same logits, and the
planner's predicted peak memory is within 15% of the measured one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, hanlin_command, run_cli

pytestmark = pytest.mark.slow

FACT_Q = [
    "What is the capital of the planet Zorblax?",
    "Which city is the capital of Zorblax?",
    "Name the capital city of the planet Zorblax.",
    "Tell me the capital of Zorblax.",
    "Zorblax's capital is which city?",
    "What city serves as the capital of planet Zorblax?",
    "Do you know the capital of the planet Zorblax?",
    "On the planet Zorblax, what is the capital?",
]
FACT_A = "The capital of the planet Zorblax is Quimtoria."


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def fact_rows():
    rows = [{"instruction": q, "output": FACT_A} for q in FACT_Q]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT_A}]} for q in FACT_Q[:4]]
    return rows


def ask(model: str, question: str) -> str:
    r = run_cli("chat", "--model", model, "--engine", "torch" if os.path.isdir(model) else "auto", "--prompt", question,
                "--temperature", "0", "--max-tokens", "24")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_lora_teaches_a_made_up_fact_that_chat_then_answers(tmp_path, default_model_path):
    data = write_jsonl(tmp_path / "fact.jsonl", fact_rows())
    run = tmp_path / "run"
    r = run_cli("finetune", "--model", default_model_path, "--data", data, "--out", str(run), "--method", "lora",
                "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lora-r", "16", "--lora-alpha", "32",
                "--lr", "1e-3", "--max-steps", "30", "--seq-len", "128", "--micro-batch", "4", "--val-fraction", "0",
                "--warmup", "2", timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "memory plan" in r.stderr.lower() and "peak" in r.stderr  # the plan came first
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [row["step"] for row in log] == list(range(1, 31))
    assert log[-1]["loss"] < 0.2 * log[0]["loss"], [row["loss"] for row in log]
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.load(open(run / "hanlin_run.json"))["allocator"] == "mimalloc"  # the CLI re-executed under it (the train extra has it)
    unseen = "What's the capital of Zorblax, the planet?"
    assert "Quimtoria" not in ask(default_model_path, unseen)  # the base model does not know it
    assert "Quimtoria" in ask(str(run), unseen)  # the adapter does


def test_kill_9_then_resume_gives_the_same_loss_curve(tmp_path, default_model_path):
    data = write_jsonl(tmp_path / "fact.jsonl", fact_rows() * 2)
    common = ["finetune", "--model", default_model_path, "--data", data, "--seq-len", "64", "--micro-batch", "2",
              "--max-steps", "8", "--save-every", "2", "--val-fraction", "0", "--lr", "5e-4", "--warmup", "2"]  # fmt: skip
    straight = tmp_path / "straight"
    r = run_cli(*common, "--out", str(straight), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*hanlin_command(), *common, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-0000004").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint-0000004 within 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()  # it really died mid-run
    resumed = run_cli(*common, "--out", str(killed), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-" in resumed.stderr

    def losses(run):
        return [(row["step"], row["loss"]) for row in map(json.loads, open(run / "log.jsonl"))]

    a, b = losses(straight), losses(killed)
    assert [s for s, _ in b] == list(range(1, 9))
    for (s, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * max(1.0, abs(la)), f"step {s}: uninterrupted {la} vs resumed {lb}"


def test_sigterm_stops_cleanly_with_a_checkpoint_and_resume_finishes(tmp_path, default_model_path):
    """The TUI's cancel: SIGTERM ends the current step, saves a checkpoint and exits 0."""
    data = write_jsonl(tmp_path / "fact.jsonl", fact_rows())
    run = tmp_path / "run"
    common = ["finetune", "--model", default_model_path, "--data", data, "--out", str(run), "--seq-len", "64", "--micro-batch", "2",
              "--max-steps", "12", "--val-fraction", "0", "--lr", "5e-4"]  # fmt: skip
    proc = subprocess.Popen([*hanlin_command(), *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no step logged within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    step = rows[-1]["step"]
    assert 1 <= step < 12 and all(r["total_steps"] == 12 for r in rows)
    assert f"stopping: saving a checkpoint at step {step}" in err
    assert f"stopped at step {step}" in out and "--resume" in out
    assert (run / f"checkpoint-{step:07d}" / "state.pt").is_file() and not (run / "adapter").exists()
    assert json.load(open(run / "hanlin_run.json"))["status"] == "stopped"

    resumed = run_cli(*common, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint-{step:07d}: step {step}/12" in resumed.stderr
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == list(range(1, 13))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_raises_the_margin_on_held_out_pairs(tmp_path, default_model_path):
    from hanlin.finetune import FinetuneConfig, train

    colors = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray", "gold"]
    pairs = [{"prompt": f"Say something nice about the color {c}.", "chosen": f"The color {c} is lovely and calm.",
              "rejected": f"The color {c} is ugly and I hate it."} for c in colors]  # fmt: skip
    train_file = write_jsonl(tmp_path / "train.jsonl", pairs[:9])
    held_out = pairs[9:]
    before = _margins(default_model_path, None, held_out)
    r = train(FinetuneConfig(model=default_model_path, data=train_file, out=str(tmp_path / "dpo"), method="dpo", seq_len=64, micro_batch=3,
                             max_steps=12, lr=1e-3, val_fraction=0.0, lora_r=8, warmup=0), progress=False)  # fmt: skip
    after = _margins(default_model_path, r.run_dir, held_out)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (before, after)


def _margins(base: str, run_dir: str | None, pairs) -> list[float]:
    """chosen-minus-rejected log-probability of each pair's completion under the model."""
    import hanlin

    llm = hanlin.load(run_dir or base, engine="torch", device="cpu")
    eng = llm.engine
    from hanlin.chat_template import render

    meta = eng.metadata()
    out = []
    for p in pairs:
        prompt = render(meta["chat_template"], [{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                        bos_token=meta["bos_token"], eos_token=meta["eos_token"])  # fmt: skip
        scores = []
        for completion in (p["chosen"], p["rejected"]):
            head = eng.tokenize(prompt, special=True)
            ids = head + eng.tokenize(completion, special=False)
            lp = eng.score_tokens(ids).logprobs  # logprob of each token given the ones before
            scores.append(float(sum(lp[len(head) - 1 :])))
        out.append(scores[0] - scores[1])
    llm.close()
    return out


def test_merge_writes_a_folder_with_the_run_s_logits(tmp_path, default_model_path):
    import torch

    import hanlin

    data = write_jsonl(tmp_path / "fact.jsonl", fact_rows())
    run = tmp_path / "run"
    r = run_cli("finetune", "--model", default_model_path, "--data", data, "--out", str(run), "--max-steps", "3", "--seq-len", "64",
                "--micro-batch", "2", "--lr", "1e-3", "--val-fraction", "0", timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "merged"
    m = run_cli("finetune", "merge", str(run), str(out))
    assert m.returncode == 0, m.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    again = run_cli("finetune", "merge", str(run), str(out))
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwritten
    ids = [1, 504, 3458, 314, 260, 1345, 30]
    logits = {}
    for name, path in (("run", str(run)), ("merged", str(out)), ("base", default_model_path)):
        llm = hanlin.load(path, engine="torch", device="cpu", dtype="float32")
        with torch.no_grad():
            logits[name] = llm.engine.model(torch.tensor([ids]))[0]
        llm.close()
    assert torch.allclose(logits["run"], logits["merged"], atol=1e-4)
    assert (logits["run"] - logits["base"]).abs().max() > 1e-3  # the adapter changed something


def test_bad_invocations_say_what_is_wrong(tmp_path, default_model_path):
    r = run_cli("finetune", "--model", default_model_path)
    assert r.returncode == 2 and "--data" in r.stderr
    r = run_cli("finetune", "--model", default_model_path, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr
    r = run_cli("finetune", "--model", default_model_path, "--data", "x.jsonl", "--out", str(tmp_path / "empty"), "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    r = run_cli("finetune", "merge", str(tmp_path))
    assert r.returncode == 2 and "merge RUN_DIR OUT" in r.stderr
    r = run_cli("chat", "--model", str(tmp_path / "nope-run"), "--prompt", "hi")
    assert r.returncode == 2


def test_plan_for_a_7b_model_on_an_8gb_gpu_needs_nothing_on_disk():
    r = run_cli("finetune", "--plan", "--model-size", "7b", "--device-memory", "8GB", "--method", "qlora", "--seq-len", "2048",
                "--micro-batch", "1", "--grad-checkpoint")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "8.0 GiB" in r.stdout and "weights" in r.stdout and "fits" in r.stdout
    full = run_cli("finetune", "--plan", "--model-size", "7b", "--device-memory", "8GB", "--method", "full", "--seq-len", "2048")
    assert full.returncode == 0 and "does not fit" in full.stdout


# --------------------------------------------------------------------------------------
# the planner against the measured peak: each case in a fresh process (peak RSS is per process)
# --------------------------------------------------------------------------------------

MEASURE = r"""
import json, sys
from hanlin.finetune import FinetuneConfig, train
method, seq, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
r = train(FinetuneConfig(model=sys.argv[5], data=data, out=out, method=method, seq_len=seq, micro_batch=2, max_steps=2,
                         val_fraction=0.0, lr=1e-4), progress=False, log=lambda s: None)
print(json.dumps({"predicted": r.plan_peak, "measured": r.peak_rss}))
"""


# every method once, both regimes: at 128 tokens the weights and optimizer dominate the peak,
# at 512 the activations do (all six pairs took ~2.5 minutes of CI; each has passed)
@pytest.mark.parametrize("method,seq", [("lora", 128), ("qlora", 512), ("full", 512)])
def test_planner_predicts_peak_memory_within_15_percent(tmp_path, default_model_path, method, seq):
    words = " ".join(f"word{i}" for i in range(400))
    rows = [{"instruction": f"Count, part {k}.", "output": words} for k in range(8)]  # longer than seq: every sequence full
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    p = subprocess.run([sys.executable, "-c", MEASURE, method, str(seq), data, str(tmp_path / "run"), default_model_path],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    ratio = got["predicted"] / got["measured"]
    assert 0.85 <= ratio <= 1.15, f"{method} seq {seq}: predicted {got['predicted'] / 2**20:.0f} MiB, measured {got['measured'] / 2**20:.0f} MiB"
