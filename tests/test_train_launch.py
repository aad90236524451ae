"""hanlin.train.launch: the rendered launch files, checked against the launchers' own parsers.

No cluster here. Each script is run for real under bash with the cluster tools (srun,
scontrol, torchrun, deepspeed) replaced by stubs that record the argv and environment they
were given; that argv is then handed to torch.distributed.run's and deepspeed's own argument
parsers, and the hostfile to deepspeed's own reader. One torchrun launch.sh (1 node x 2 cpu)
is run with the real torchrun and a probe module in place of the trainer.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hanlin.train.launch import LaunchSpec, render, write

CONFIG = "configs/pretrain 910b.yaml"  # a space, so quoting is exercised

# The two jobs the issue names: 4 nodes x 8 Ascend 910B, 2 nodes x 8 H100.
JOBS = {
    "910b": dict(nodes=4, per_node=8, device="npu", interface="enp189s0f0"),
    "h100": dict(nodes=2, per_node=8, device="cuda", interface="ens1f0"),
}

# Option names documented in the sbatch man page (slurm.schedmd.com/sbatch.html, "OPTIONS").
# Only a subset, but every option we write must be one of these.
SBATCH_OPTIONS = {
    "account", "array", "chdir", "constraint", "cpus-per-gpu", "cpus-per-task", "dependency",
    "error", "exclusive", "export", "gpus", "gpus-per-node", "gpus-per-task", "gres", "job-name",
    "mail-type", "mail-user", "mem", "mem-per-cpu", "mem-per-gpu", "nodelist", "nodes", "ntasks",
    "ntasks-per-node", "output", "partition", "qos", "signal", "time",
}

STUB = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORD_DIR/{name}.argv"
env -0 > "$RECORD_DIR/{name}.env"
"""
SRUN_STUB = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORD_DIR/srun.argv"
env -0 > "$RECORD_DIR/srun.env"
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
SCONTROL_STUB = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 2
# The first name, a pause, then the rest: a reader that stops after line 1 (`| head -n 1`)
# closes the pipe early, and under pipefail the SIGPIPE would abort the script.
echo cn1; sleep 0.2
for i in $(seq 2 "$STUB_NODES"); do echo "cn$i"; done
"""


def _stubs(tmp: Path) -> Path:
    bin_dir = tmp / "stub-bin"
    bin_dir.mkdir()
    scripts = {"torchrun": STUB.format(name="torchrun"), "deepspeed": STUB.format(name="deepspeed"),
               "srun": SRUN_STUB, "scontrol": SCONTROL_STUB}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp / "record").mkdir()
    (tmp / "cann_set_env.sh").write_text("export ASCEND_TOOLKIT_HOME=/stub/ascend\n")
    return bin_dir


def _run(script: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp / "stub-bin"
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp), "RECORD_DIR": str(tmp / "record"),
            "CANN_SET_ENV": str(tmp / "cann_set_env.sh"), **env}
    return subprocess.run(["bash", str(script)], env=full, cwd=tmp, capture_output=True, text=True, timeout=60)


def _recorded(tmp: Path, name: str) -> tuple[list[str], dict[str, str]]:
    argv = (tmp / "record" / f"{name}.argv").read_text().split("\0")[:-1]
    env = dict(item.split("=", 1) for item in (tmp / "record" / f"{name}.env").read_text().split("\0") if "=" in item)
    return argv, env


def _torch_config(argv: list[str], monkeypatch):
    from torch.distributed.run import config_from_args, get_args_parser

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # config_from_args sets it
    args = get_args_parser().parse_args(argv)
    config, cmd, cmd_args = config_from_args(args)
    return args, config, cmd_args


def _check_env(env: dict[str, str], device: str, launcher: str) -> None:
    if device == "npu":
        assert env["HCCL_CONNECT_TIMEOUT"] == "1200" and env["HCCL_EXEC_TIMEOUT"] == "3600"
        assert env["HCCL_SOCKET_IFNAME"] == JOBS["910b"]["interface"]
        assert env["ASCEND_TOOLKIT_HOME"] == "/stub/ascend"  # CANN's set_env.sh was sourced
        if launcher != "deepspeed":
            assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        assert not [k for k in env if k.startswith("NCCL_")]
    else:
        assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_SOCKET_IFNAME"] == JOBS["h100"]["interface"]
        assert not [k for k in env if k.startswith(("HCCL_", "ASCEND_"))]


@pytest.mark.parametrize("job", JOBS)
def test_env_sh_every_variable_commented_and_device_specific(job):
    spec = LaunchSpec("torchrun", config=CONFIG, **JOBS[job])
    text = render(spec)["env.sh"]
    lines = text.splitlines()
    exports = [i for i, line in enumerate(lines) if line.startswith("export ")]
    assert exports
    for i in exports:
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, lines[i]
    names = {lines[i].split()[1].split("=")[0] for i in exports}
    if spec.device == "npu":
        assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in lines
        assert {"HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_SOCKET_IFNAME"} <= names
        assert "/usr/local/Ascend/ascend-toolkit/set_env.sh" in text
        assert not re.search(r"\bNCCL_", text)
    else:
        assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= names
        assert "HCCL" not in text and "ASCEND" not in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize("job", JOBS)
def test_torchrun_launch_parsed_by_torchrun(job, tmp_path, monkeypatch):
    spec = LaunchSpec("torchrun", config=CONFIG, **JOBS[job])
    out = tmp_path / "launch"
    write(render(spec), out)
    _stubs(tmp_path)
    done = _run(out / "launch.sh", tmp_path, MASTER_ADDR="10.1.2.3")
    assert done.returncode == 0, done.stderr
    argv, env = _recorded(tmp_path, "torchrun")
    args, config, cmd_args = _torch_config(argv, monkeypatch)
    assert (config.min_nodes, config.max_nodes) == (spec.nodes, spec.nodes)
    assert config.nproc_per_node == 8
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "10.1.2.3:29500"
    assert config.run_id == "hanlin-train" and config.max_restarts == 3
    assert args.module and args.training_script == "hanlin.train"
    assert args.training_script_args == ["--config", CONFIG, "--resume", "auto"]
    assert cmd_args[:3] == ["-u", "-m", "hanlin.train"]
    _check_env(env, spec.device, "torchrun")


def test_torchrun_launch_demands_master_addr(tmp_path):
    out = tmp_path / "launch"
    write(render(LaunchSpec("torchrun", config=CONFIG, **JOBS["h100"])), out)
    _stubs(tmp_path)
    done = _run(out / "launch.sh", tmp_path)
    assert done.returncode != 0 and "MASTER_ADDR" in done.stderr
    assert not (tmp_path / "record" / "torchrun.argv").exists()


@pytest.mark.parametrize("job", JOBS)
def test_deepspeed_launch_parsed_by_deepspeed(job, tmp_path):
    runner = pytest.importorskip("deepspeed.launcher.runner")
    from deepspeed.launcher.multinode_runner import PDSHRunner

    hosts = [f"{job}-n{i}" for i in range(JOBS[job]["nodes"])]
    spec = LaunchSpec("deepspeed", config=CONFIG, hosts=hosts, **JOBS[job])
    out = tmp_path / "launch"
    files = write(render(spec), out)
    assert {p.name for p in files} == {"env.sh", "hostfile", ".deepspeed_env", "launch.sh"}
    _stubs(tmp_path)
    done = _run(out / "launch.sh", tmp_path)
    assert done.returncode == 0, done.stderr
    argv, env = _recorded(tmp_path, "deepspeed")

    args = runner.parse_args(argv)
    assert Path(args.hostfile) == out / "hostfile"
    assert (args.num_nodes, args.num_gpus) == (spec.nodes, 8)
    assert (args.master_addr, args.master_port) == (hosts[0], 29500)
    assert args.launcher == "pdsh" and args.module
    assert args.user_script == "hanlin.train"
    assert args.user_args == ["--config", CONFIG, "--resume", "auto"]

    pool = runner.fetch_hostfile(args.hostfile)  # deepspeed's own hostfile reader
    assert list(pool.items()) == [(h, 8) for h in hosts]
    active = runner.apply_num_nodes_and_gpus(runner.parse_inclusion_exclusion(pool, "", ""),
                                             args.num_nodes, args.num_gpus)
    assert {h: len(s) for h, s in active.items()} == {h: 8 for h in hosts}

    # .deepspeed_env: DS_ENV_FILE is absolute, so the runner's os.path.join(dir, name) finds it;
    # read it exactly as runner.main does (split on the first '=', every line) into the pdsh cmd.
    ds_env = Path(env["DS_ENV_FILE"])
    assert ds_env == out / ".deepspeed_env" and os.path.join(str(tmp_path), str(ds_env)) == str(ds_env)
    pdsh = PDSHRunner(args, runner.encode_world_info(active))
    for line in ds_env.read_text().splitlines(keepends=True):
        key, val = line.split("=", maxsplit=1)
        pdsh.add_export(key, val)
    cmd, _, _ = pdsh.get_cmd(dict(os.environ), active)
    assert cmd[:2] == ["pdsh", "-S"] and cmd[cmd.index("-w") + 1] == ",".join(hosts)
    assert "deepspeed.launcher.launch" in cmd and "--module" in cmd and "--node_rank=%n" in cmd
    script = cmd.index("hanlin.train")  # the user script comes after the launcher's own flags
    assert script > cmd.index("--module")
    assert cmd[script:] == ["hanlin.train", "--config", CONFIG.join('""'), "--resume", "auto"]
    exports = cmd[cmd.index("-w") + 2]
    if spec.device == "npu":
        assert "export HCCL_CONNECT_TIMEOUT=1200;" in exports and "ASCEND_RT_VISIBLE_DEVICES" not in exports
    else:
        assert "export NCCL_DEBUG=WARN;" in exports and "HCCL" not in exports
    _check_env(env, spec.device, "deepspeed")


def test_deepspeed_placeholder_hosts_are_marked_and_refused(tmp_path):
    runner = pytest.importorskip("deepspeed.launcher.runner")
    spec = LaunchSpec("deepspeed", config=CONFIG, **JOBS["910b"])
    out = tmp_path / "launch"
    write(render(spec), out)
    assert list(runner.fetch_hostfile(str(out / "hostfile"))) == [f"CHANGE-ME-node-{i}" for i in range(4)]
    _stubs(tmp_path)
    done = _run(out / "launch.sh", tmp_path)
    assert done.returncode == 1 and "CHANGE-ME" in done.stderr
    assert not (tmp_path / "record" / "deepspeed.argv").exists()


@pytest.mark.parametrize("job", JOBS)
def test_sbatch_script_runs_srun_torchrun(job, tmp_path, monkeypatch):
    spec = LaunchSpec("slurm", config=CONFIG, partition="train", **JOBS[job])
    out = tmp_path / "launch"
    write(render(spec), out)
    script = out / "train.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "set -euo pipefail" in text

    # sbatch reads #SBATCH lines only up to the first command line.
    header = []
    for line in text.splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            header.append(line)
    opts = dict(re.fullmatch(r"#SBATCH --([a-z-]+)=(\S+)", line).groups() for line in header)
    assert set(opts) <= SBATCH_OPTIONS, set(opts) - SBATCH_OPTIONS
    assert opts["nodes"] == str(spec.nodes) and opts["ntasks-per-node"] == "1"
    assert opts["job-name"] == "hanlin-train" and opts["time"] == "24:00:00" and opts["partition"] == "train"
    assert int(opts["cpus-per-task"]) >= 8
    if spec.device == "cuda":
        assert opts["gpus-per-node"] == "8" and "gres" not in opts
    else:
        assert opts["gres"] == "npu:8" and "gpus-per-node" not in opts

    _stubs(tmp_path)
    done = _run(script, tmp_path, SLURM_SUBMIT_DIR=str(out), SLURM_JOB_NODELIST=f"cn[1-{spec.nodes}]",
                SLURM_JOB_ID="4242", STUB_NODES=str(spec.nodes))
    assert done.returncode == 0, done.stderr
    srun_argv, _ = _recorded(tmp_path, "srun")
    assert srun_argv[:3] == [f"--nodes={spec.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    argv, env = _recorded(tmp_path, "torchrun")
    args, config, _ = _torch_config(argv, monkeypatch)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (spec.nodes, spec.nodes, 8)
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "cn1:29500" and config.run_id == "4242"
    assert args.module and args.training_script == "hanlin.train"
    assert args.training_script_args == ["--config", CONFIG, "--resume", "auto"]
    assert env["MASTER_ADDR"] == "cn1"
    _check_env(env, spec.device, "slurm")


PROBE = """import os, sys
rank = os.environ["RANK"]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
with open(os.path.join(os.environ["PROBE_OUT"], "rank" + rank), "w") as f:
    f.write(" ".join(os.environ[k] for k in keys) + "\\n" + " ".join(sys.argv[1:]))
"""


def test_torchrun_launch_really_starts_two_cpu_workers(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "torchrun").exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "hanlin_probe_worker.py").write_text(PROBE)
    (tmp_path / "out").mkdir()
    spec = LaunchSpec("torchrun", nodes=1, per_node=2, device="cpu", config="probe.yaml",
                      master_addr="127.0.0.1", master_port=port, module="hanlin_probe_worker",
                      max_restarts=0, cpus_per_task=2)
    write(render(spec), tmp_path / "launch")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(tmp_path / "probe"),
           "PROBE_OUT": str(tmp_path / "out"), "HOME": os.environ.get("HOME", str(tmp_path))}
    done = subprocess.run(["bash", str(tmp_path / "launch" / "launch.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = {p.name: p.read_text().split("\n") for p in (tmp_path / "out").iterdir()}
    assert set(seen) == {"rank0", "rank1"}
    for name, (values, argv) in seen.items():
        rank, local_rank, world, addr, _port, omp = values.split()
        assert name == f"rank{rank}" and local_rank == rank and world == "2"
        assert addr and omp == "1"  # 2 CPUs / 2 workers, from env.sh
        assert argv == "--config probe.yaml --resume auto"


@pytest.mark.parametrize("field, kwargs", [
    ("launcher", dict(launcher="mpirun")),
    ("device", dict(device="tpu")),
    ("nodes", dict(nodes=0)),
    ("per_node", dict(per_node=0)),
    ("per_node", dict(device="npu", per_node=17)),
    ("master_port", dict(master_port=70000)),
    ("max_restarts", dict(max_restarts=-1)),
    ("config", dict(config="")),
    ("job_name", dict(job_name="my job; rm -rf /")),
    ("time_limit", dict(launcher="slurm", time_limit="one day")),
    ("master_addr", dict(launcher="slurm", master_addr="10.0.0.1")),
    ("hosts", dict(launcher="deepspeed", hosts=["a"])),
    ("hosts", dict(launcher="deepspeed", nodes=2, hosts=["a", "a"])),
    ("hosts", dict(launcher="torchrun", nodes=1, hosts=["a"])),
    ("interface", dict(interface="eth0 ib0")),
    ("module", dict(module="hanlin..train")),
    ("hccl_connect_timeout", dict(device="npu", hccl_connect_timeout=60)),
])
def test_bad_spec_names_the_field(field, kwargs):
    base = dict(launcher="torchrun", nodes=2, per_node=8, device="cuda", config="c.yaml")
    with pytest.raises(ValueError, match=rf"LaunchSpec\.{field}="):
        LaunchSpec(**{**base, **kwargs})


def test_write_is_atomic_executable_and_refuses_to_overwrite(tmp_path):
    files = render(LaunchSpec("slurm", nodes=2, per_node=8, device="cuda", config="c.yaml"))
    paths = write(files, tmp_path)
    assert [p.name for p in paths] == list(files)
    assert all(p.read_text() == files[p.name] for p in paths)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert mode["train.sbatch"] == 0o755 and mode["env.sh"] == 0o644
    (tmp_path / "env.sh").write_text("mine\n")
    with pytest.raises(FileExistsError, match="env.sh"):
        write(files, tmp_path)
    assert (tmp_path / "env.sh").read_text() == "mine\n"  # nothing was touched
    write(files, tmp_path, force=True)
    assert (tmp_path / "env.sh").read_text() == files["env.sh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temp files left
