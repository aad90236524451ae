"""hanlin train: config checks, one process vs two (ZeRO-3, FSDP2), a rank killed with kill -9
and restarted by torchrun, checkpoints that verify, the run folder.

Real processes throughout: torchrun and the deepspeed launcher start real workers that talk over
gloo on this machine. The data is a shard folder written by the real ShardWriter from a small
deterministic token stream (an arithmetic pattern a tiny model learns within a few steps), so the
tests need no tokenizer and run in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

torch = pytest.importorskip("torch")

from hanlin.backends.base import ConfigError  # noqa: E402
from hanlin.train import checkpoint as C  # noqa: E402
from hanlin.train.config import TrainConfig  # noqa: E402
from hanlin.train.metrics import read_log  # noqa: E402
from train_helpers import make_shards  # noqa: E402

ARCH = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def write_config(path, out, shards, **sections):
    cfg = {
        "out": str(out),
        "model": {"arch": ARCH},
        "data": {"train": shards, "seq_len": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 10, "global_batch": 8, "micro_batch": 2, "device": "cpu"},
        "checkpoint": {"every": 5},
        "eval": {"every": 5, "batches": 2},
        "log": {"tensorboard": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def hanlin(*args, timeout=240, **kw):
    return subprocess.run([sys.executable, "-m", "hanlin.apps.cli", *args], capture_output=True, text=True, timeout=timeout, **kw)


def train_losses(out):
    return [(r["step"], r["loss"]) for r in read_log(os.path.join(out, "log.jsonl")) if r.get("kind") is None]


# -- the config is refused before anything starts ----------------------------------------------


def test_unknown_key_is_named_with_the_closest_known_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: x\ndata: {train: s}\nparallel: {stratgy: zero3}\n")
    with pytest.raises(ConfigError, match=r"parallel\.stratgy.*did you mean 'strategy'"):
        TrainConfig.from_yaml(str(path))
    with pytest.raises(ConfigError, match=r"model\.arch\.n_layer\b"):
        TrainConfig.from_dict({"data": {"train": "s"}, "model": {"arch": {"n_layer": 2}}}).check()
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer"):
        TrainConfig.from_dict({"data": {"train": "s"}, "train": {"steps": "many"}})


def test_impossible_combinations_are_refused_naming_the_key():
    base = {"data": {"train": "s"}, "train": {"global_batch": 8, "micro_batch": 2}}
    with pytest.raises(ConfigError, match=r"model\.quant.*cannot be sharded by zero3"):
        TrainConfig.from_dict({**base, "model": {"quant": "nf4"}, "parallel": {"strategy": "zero3"}}).check(2)
    with pytest.raises(ConfigError, match=r"train\.global_batch: 8 is not a multiple of micro_batch x world size \(2 x 3 = 6\)"):
        TrainConfig.from_dict(base).check(3)
    with pytest.raises(ConfigError, match=r"parallel\.offload_optimizer.*ZeRO"):
        TrainConfig.from_dict({**base, "parallel": {"strategy": "fsdp2", "offload_optimizer": True}}).check(2)
    TrainConfig.from_dict(base).check(4)  # 8 = 2 x 4: fine


def test_cli_refuses_a_world_size_that_does_not_divide_the_batch_before_starting(tmp_path, shards):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, shards)
    r = hanlin("train", "--config", cfg, "--nproc", "3")
    assert r.returncode != 0
    assert "train.global_batch" in r.stderr and "2 x 3 = 6" in r.stderr
    assert "torch.distributed.run" not in r.stderr  # no launcher was started
    assert not out.exists()


def test_a_shard_that_fails_its_checksum_is_named(tmp_path):
    folder = make_shards(tmp_path / "shards", docs=60)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    victim = manifest["splits"]["train"]["shards"][0]["bin"]
    with open(tmp_path / "shards" / victim, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    r = hanlin("train", "--config", write_config(tmp_path / "c.yaml", tmp_path / "run", folder))
    assert r.returncode != 0
    assert f"shard {victim} fails its checksum" in r.stderr


# -- one process -------------------------------------------------------------------------------


def test_one_process_run_learns_logs_checkpoints_and_saves_a_loadable_model(tmp_path, shards):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, shards, log={"tensorboard": True})
    r = hanlin("train", "--config", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_log(str(out / "log.jsonl"))
    train = [x for x in rows if x.get("kind") is None]
    held = [x for x in rows if x.get("kind") == "heldout"]
    assert [x["step"] for x in train] == list(range(1, 11))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns the pattern
    assert [x["step"] for x in held] == [0, 5, 10]  # the starting point, then every eval.every steps
    assert held[-1]["loss"] < held[0]["loss"] - 0.5 and held[-1]["ppl"] > 1
    for key in ("grad_norm", "lr", "tokens_per_s_per_device", "memory_gib"):
        assert train[-1][key] > 0, key
    assert train[-1]["mfu"] is None  # no known peak FLOP/s for a CPU: no made-up MFU
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "tensorboard"))
    assert [s for s, _ in C.listed(str(out / "checkpoints"))] == [5, 10]
    for _, folder in C.listed(str(out / "checkpoints")):
        assert C.verify(folder) is None

    from hanlin.backends.torch.weights import load_hf_folder

    model = load_hf_folder(str(out / "final"))
    state = torch.load(out / "checkpoints" / "step-0000010" / "state" / "state.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model." + name]), name  # the final folder is the last step's weights

    again = hanlin("train", "--config", cfg)  # the folder holds a run: refused without --resume
    assert again.returncode != 0 and "--resume auto" in again.stderr


def test_resume_auto_skips_a_checkpoint_that_fails_verification(tmp_path, shards):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, shards, checkpoint={"every": 3, "keep": 3})
    assert hanlin("train", "--config", cfg).returncode == 0
    full = train_losses(str(out))
    ck = out / "checkpoints"
    assert [s for s, _ in C.listed(str(ck))] == [6, 9, 10]
    # damage the newest two: one loses its manifest (an unfinished save), one has a flipped byte
    os.remove(ck / "step-0000010" / "MANIFEST.json")
    with open(ck / "step-0000009" / "state" / "state.pt", "r+b") as f:
        f.seek(-5, 2)
        b = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    assert C.verify(str(ck / "step-0000009")) == "state/state.pt fails its checksum"
    r = hanlin("train", "--config", cfg, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-0000010 skipped: no MANIFEST.json" in r.stderr
    assert "step-0000009 skipped: state/state.pt fails its checksum" in r.stderr
    assert "resumed from" in r.stderr and "step-0000006" in r.stderr
    assert train_losses(str(out)) == full  # steps 7..10 again, the same numbers
    # the rerun's saves of steps 9 and 10 replaced the damaged ones whole; nothing left aside
    assert C.verify(str(ck / "step-0000009")) is None and C.verify(str(ck / "step-0000010")) is None
    assert not [n for n in os.listdir(ck) if n.startswith(".")]


# -- two processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, shards):
    base = tmp_path_factory.mktemp("one")
    r = hanlin("train", "--config", write_config(base / "c.yaml", base / "run", shards))
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "run"


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, shards, one_process_run, strategy):
    one = one_process_run
    two = tmp_path / "two"
    r2 = hanlin("train", "--config", write_config(tmp_path / "c2.yaml", two, shards, parallel={"strategy": strategy}), "--nproc", "2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"{strategy} on 2 process(es)" in r2.stderr and "gloo" in r2.stderr
    a, b = train_losses(str(one)), train_losses(str(two))
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    # float32 on CPU: only the order of the gradient reductions differs
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    from hanlin.backends.torch.weights import load_hf_folder

    m1, m2 = load_hf_folder(str(one / "final")), load_hf_folder(str(two / "final"))
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(p1, p2, atol=1e-4), name  # the gathered final weights are the whole model


def test_deepspeed_launcher_runs_zero2(tmp_path, shards):
    out = tmp_path / "ds"
    r = hanlin("train", "--config", write_config(tmp_path / "c.yaml", out, shards, parallel={"strategy": "zero2"},
                                                 train={"steps": 4}, checkpoint={"every": 0}, eval={"every": 0}),
               "--nproc", "2", "--launcher", "deepspeed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepspeed.launcher.runner" in r.stderr and "zero2 on 2 process(es)" in r.stderr
    assert [s for s, _ in train_losses(str(out))] == [1, 2, 3, 4]
    assert C.verify(str(out / "checkpoints" / "step-0000004")) is None  # DeepSpeed's shards, sealed by us


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_a_rank_killed_mid_run_is_restarted_and_gives_the_same_loss_curve(tmp_path, shards, strategy):
    psutil = pytest.importorskip("psutil")
    sections = dict(parallel={"strategy": strategy}, train={"steps": 24, "global_batch": 16, "micro_batch": 2},
                    data={"seq_len": 128}, checkpoint={"every": 4, "keep": 2}, eval={"every": 0})
    clean = tmp_path / "clean"
    r = hanlin("train", "--config", write_config(tmp_path / "c1.yaml", clean, shards, **sections), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "c2.yaml", out, shards, **sections)
    proc = subprocess.Popen([sys.executable, "-m", "hanlin.apps.cli", "train", "--config", cfg, "--nproc", "2",
                             "--max-restarts", "1", "--resume", "auto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    killed_at = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [row["step"] for row in read_log(str(log))] if log.exists() else []
        if steps and steps[-1] >= 6 and C.listed(str(out / "checkpoints")):
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "hanlin.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
            if workers:
                killed_at = steps[-1]
                os.kill(workers[0].pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=240)
    assert killed_at is not None and killed_at < 24, "the run ended before a rank could be killed"
    assert proc.returncode == 0, output[-4000:]
    assert "resumed from" in output  # the restarted group continued from a checkpoint, not from step 0
    assert train_losses(str(out)) == train_losses(str(clean))


def test_gradient_checkpointing_changes_memory_not_the_numbers(tmp_path, shards):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    short = dict(train={"steps": 3}, checkpoint={"every": 0}, eval={"every": 0})
    assert hanlin("train", "--config", write_config(tmp_path / "a.yaml", plain, shards, **short)).returncode == 0
    r = hanlin("train", "--config", write_config(tmp_path / "b.yaml", ckpt, shards, **{**short, "train": {"steps": 3, "grad_checkpointing": True}}))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_losses(str(plain)), train_losses(str(ckpt))
    assert len(a) == 3 and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5  # recomputation, same math


def test_bfloat16_runs_where_the_cpu_computes_it_and_is_refused_where_it_does_not(tmp_path, shards):
    from hanlin.devices import get_device

    cpu = get_device("cpu")
    out = tmp_path / "bf16"
    r = hanlin("train", "--config", write_config(tmp_path / "c.yaml", out, shards, train={"steps": 3, "dtype": "bfloat16"},
                                                 checkpoint={"every": 0}, eval={"every": 0}))
    if "bfloat16" in cpu.dtypes:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "bfloat16" in r.stderr and len(train_losses(str(out))) == 3
    else:
        assert r.returncode != 0
        assert "train.dtype" in r.stderr and "does not compute bfloat16" in r.stderr


def test_the_collective_backend_follows_the_device():
    from hanlin.train.parallel import backend_for

    assert [backend_for(k, "auto") for k in ("cuda", "npu", "cpu")] == ["nccl", "hccl", "gloo"]
    assert backend_for("cuda", "gloo") == "gloo"  # a config that names one gets it


def test_print_launch_writes_a_cluster_job_checked_for_its_world_size(tmp_path, shards):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", shards, train={"global_batch": 64, "micro_batch": 2})
    launch = tmp_path / "launch"
    r = hanlin("train", "--config", cfg, "--print-launch", "slurm", "--nodes", "4", "--per-node", "8", "--device", "npu",
               "--launch-out", str(launch))
    assert r.returncode == 0, r.stderr
    sbatch = (launch / "train.sbatch").read_text()
    assert "#SBATCH --nodes=4" in sbatch and f"--config {cfg}" in sbatch and "--nproc-per-node 8" in sbatch
    assert "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in (launch / "env.sh").read_text()
    # 64 sequences over 2 nodes x 24 devices x micro-batch 2 does not divide: refused, nothing written
    bad = tmp_path / "bad"
    r = hanlin("train", "--config", cfg, "--print-launch", "torchrun", "--nodes", "2", "--per-node", "24", "--device", "cuda",
               "--launch-out", str(bad))
    assert r.returncode != 0 and "2 x 48 = 96" in r.stderr and not bad.exists()
