"""Multi-node launch files for `hanlin train`: the sbatch script, hostfile and environment
for N nodes x M devices, rendered as text so a person can read them before running them.

Every process the launchers start runs the same thing:

    python -m hanlin.train --config CONFIG.yaml --resume auto

and reads the torch.distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) that the launcher sets. The three launchers differ in who starts the processes:

- torchrun (torch.distributed.run): one `torchrun` per node, started by you (or by srun).
  Each starts M workers. We use the c10d rendezvous: every node runs the same command and
  meets the others at --rdzv-endpoint HOST:PORT, so no node needs to be told its rank
  (torch's own help says --node-rank is only read by the static rendezvous, and warns
  when it is given with c10d; we do not pass it). --max-restarts lets the agents restart
  the whole group after a worker dies; the trainer picks up from its last checkpoint
  (--resume auto).
- deepspeed (the `deepspeed` runner): started once, on node 0. It reads the hostfile
  (`host slots=M` lines), ssh-es into every host with pdsh and starts
  deepspeed.launcher.launch there, which sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR, sets
  the visible-devices variable (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES) from
  the slots, and runs `python -u -m hanlin.train ... --local_rank=N`. Variables listed in
  `.deepspeed_env` (plain KEY=VALUE lines; the runner splits each line on its first `=`,
  so that file holds no comments or blank lines) are exported on every node. Only the
  pdsh backend is rendered: in deepspeed 0.19.8 the openmpi backend refuses
  --num_nodes/--num_gpus and the slurm backend drops --module and does not set RANK or
  LOCAL_RANK, so neither would start this trainer as written. Inside Slurm, use the
  `slurm` launcher here instead.
- slurm: `sbatch train.sbatch`. Slurm allocates N nodes with one task each; the batch
  script (which runs on the first node) takes MASTER_ADDR from the first name of
  `scontrol show hostnames "$SLURM_JOB_NODELIST"`, and `srun` starts one torchrun per
  node, all meeting at MASTER_ADDR:MASTER_PORT with rendezvous id $SLURM_JOB_ID.

The environment (env.sh, commented line by line) per device kind:

- cuda (NCCL): NCCL_DEBUG=WARN so a failing collective says why without flooding the log;
  NCCL_SOCKET_IFNAME only when you name the interface (NCCL picks one itself otherwise;
  InfiniBand HCAs are found on their own, so no NCCL_IB_* is set). CUDA_VISIBLE_DEVICES
  is left to Slurm / the launcher.
- npu (HCCL): CANN's set_env.sh is sourced (default /usr/local/Ascend/ascend-toolkit/
  set_env.sh, the toolkit's install path for root; override with CANN_SET_ENV);
  ASCEND_RT_VISIBLE_DEVICES=0,...,M-1 pins the workers to the first M NPUs (so device index
  == LOCAL_RANK); HCCL_CONNECT_TIMEOUT (CANN default 120 s, range [120, 7200]) is raised
  because every rank loads the model before the first collective; HCCL_EXEC_TIMEOUT (CANN
  default 1836 s) is raised so ranks waiting at a collective while another rank writes a
  checkpoint do not time out; HCCL_SOCKET_IFNAME only when you name the interface
  (HCCL_IF_IP would need a different value on every node, so it is not written).
- cpu (gloo): OMP_NUM_THREADS = CPUs per node / workers per node, so the M workers do not
  oversubscribe the cores (torchrun would otherwise force 1).
- any kind, interface named: GLOO_SOCKET_IFNAME, for the gloo groups torch uses for CPU
  tensors and object collectives.

`render(spec)` returns {file name: text}; `write(files, out_dir)` writes them atomically.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHERS = ("slurm", "torchrun", "deepspeed")
DEVICES = ("cuda", "npu", "cpu")
MAX_PER_NODE = {"cuda": 16, "npu": 16, "cpu": 1024}
HOST_PLACEHOLDER = "CHANGE-ME-node-{i}"
CANN_SET_ENV_DEFAULT = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
EXECUTABLE = ("launch.sh", "train.sbatch")

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# sbatch --time forms (man sbatch): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")


@dataclass
class LaunchSpec:
    """What to launch and where. Paths and names end up in shell scripts, so they are checked."""

    launcher: str  # "slurm" | "torchrun" | "deepspeed"
    nodes: int  # N machines
    per_node: int  # M devices (worker processes) per machine
    device: str  # "cuda" | "npu" | "cpu"
    config: str  # the training config every worker reads
    master_addr: str | None = None  # node 0's address; slurm computes it, deepspeed uses hosts[0]
    master_port: int = 29500
    job_name: str = "hanlin-train"
    max_restarts: int = 3  # torchrun restarts of the whole worker group after a failure
    time_limit: str = "24:00:00"  # sbatch --time
    partition: str | None = None  # sbatch --partition
    interface: str | None = None  # NIC for NCCL/HCCL/gloo sockets, e.g. "eth0", "ib0"
    hosts: list[str] | None = None  # deepspeed hostfile; default: CHANGE-ME-node-i placeholders
    cpus_per_task: int | None = None  # sbatch --cpus-per-task (all CPUs for one node's workers)
    gres: str | None = None  # sbatch --gres override; npu default "npu:M"
    module: str = "hanlin.train"  # the worker module (`python -m`)
    resume: str = "auto"
    hccl_connect_timeout: int = 1200  # seconds, CANN range [120, 7200]
    hccl_exec_timeout: int = 3600  # seconds

    def __post_init__(self) -> None:
        def bad(name: str, value, want: str) -> ValueError:
            return ValueError(f"LaunchSpec.{name}={value!r} is invalid: {want}")

        if self.launcher not in LAUNCHERS:
            raise bad("launcher", self.launcher, f"use one of {', '.join(LAUNCHERS)}")
        if self.device not in DEVICES:
            raise bad("device", self.device, f"use one of {', '.join(DEVICES)}")
        for name in ("nodes", "per_node", "master_port", "max_restarts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(name, value, "must be an integer")
        if self.nodes < 1:
            raise bad("nodes", self.nodes, "must be >= 1")
        if self.per_node < 1:
            raise bad("per_node", self.per_node, "must be >= 1")
        limit = MAX_PER_NODE[self.device]
        if self.per_node > limit:
            raise bad("per_node", self.per_node, f"{self.device} nodes hold at most {limit} devices")
        if not 1 <= self.master_port <= 65535:
            raise bad("master_port", self.master_port, "must be a TCP port in 1..65535")
        if self.max_restarts < 0:
            raise bad("max_restarts", self.max_restarts, "must be >= 0")
        if not self.config or any(c in self.config for c in "\n\r\0"):
            raise bad("config", self.config, "give the path of the training config YAML")
        if not _NAME.match(self.job_name):
            raise bad("job_name", self.job_name, "letters, digits, '_', '.', '-' only")
        if not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", self.module):
            raise bad("module", self.module, "a dotted Python module name such as hanlin.train")
        if not _NAME.match(self.resume):
            raise bad("resume", self.resume, "'auto', 'never' or a checkpoint name")
        if not _TIME.match(self.time_limit):
            raise bad("time_limit", self.time_limit, "an sbatch --time value such as 24:00:00 or 2-00:00:00")
        for name in ("partition", "interface", "master_addr", "gres"):
            value = getattr(self, name)
            if value is not None and not re.match(r"^[A-Za-z0-9_.:\-]+$", value):
                raise bad(name, value, "letters, digits, '_', '.', ':', '-' only")
        if self.launcher == "slurm" and self.master_addr is not None:
            raise bad("master_addr", self.master_addr,
                      "the sbatch script takes it from SLURM_JOB_NODELIST; leave it unset")
        if self.hosts is not None:
            if self.launcher != "deepspeed":
                raise bad("hosts", self.hosts, "only the deepspeed launcher reads a hostfile")
            if len(self.hosts) != self.nodes:
                raise bad("hosts", self.hosts, f"give exactly nodes={self.nodes} host names")
            if len(set(self.hosts)) != len(self.hosts):
                raise bad("hosts", self.hosts, "host names must be unique")
            for host in self.hosts:
                if not re.match(r"^[A-Za-z0-9_.:\-]+$", host or ""):
                    raise bad("hosts", self.hosts, f"{host!r} is not a host name")
        if self.cpus_per_task is not None and (not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1):
            raise bad("cpus_per_task", self.cpus_per_task, "must be an integer >= 1")
        if not 120 <= self.hccl_connect_timeout <= 7200:
            raise bad("hccl_connect_timeout", self.hccl_connect_timeout, "CANN accepts 120..7200 seconds")
        if self.hccl_exec_timeout < 0:
            raise bad("hccl_exec_timeout", self.hccl_exec_timeout, "must be >= 0 (0 = never, on 910B)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    @property
    def host_list(self) -> list[str]:
        return list(self.hosts) if self.hosts else [HOST_PLACEHOLDER.format(i=i) for i in range(self.nodes)]

    @property
    def cpus(self) -> int:
        return self.cpus_per_task if self.cpus_per_task is not None else 8 * self.per_node


@dataclass
class EnvVar:
    name: str
    value: str
    why: str  # one line, written above the export


@dataclass
class _Env:
    vars: list[EnvVar] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # comment lines for what is deliberately unset


def environment(spec: LaunchSpec) -> list[EnvVar]:
    """The variables every worker needs, each with the reason it is set."""
    return _environment(spec).vars


def _environment(spec: LaunchSpec) -> _Env:
    env = _Env()
    add = env.vars.append
    if spec.device == "cuda":
        add(EnvVar("NCCL_DEBUG", "WARN", "NCCL prints why a collective failed, without INFO-level noise"))
        if spec.interface:
            add(EnvVar("NCCL_SOCKET_IFNAME", spec.interface,
                       "NCCL bootstrap/socket traffic goes over this NIC, not docker0 or lo"))
        env.notes.append("CUDA_VISIBLE_DEVICES is not set: Slurm or the launcher assigns the GPUs.")
        env.notes.append("No NCCL_IB_*: NCCL finds InfiniBand HCAs itself; set them only for a known fabric issue.")
    elif spec.device == "npu":
        if spec.launcher == "deepspeed":
            env.notes.append("ASCEND_RT_VISIBLE_DEVICES is not set: deepspeed.launcher.launch sets it on "
                             "each node from the hostfile slots.")
        else:
            ids = ",".join(str(i) for i in range(spec.per_node))
            add(EnvVar("ASCEND_RT_VISIBLE_DEVICES", ids,
                       f"workers use NPUs 0..{spec.per_node - 1}, so NPU index == LOCAL_RANK"))
        add(EnvVar("HCCL_CONNECT_TIMEOUT", str(spec.hccl_connect_timeout),
                   "seconds HCCL waits for all ranks to connect (CANN default 120); model loading delays the first collective"))
        add(EnvVar("HCCL_EXEC_TIMEOUT", str(spec.hccl_exec_timeout),
                   "seconds a rank waits in a collective (CANN default 1836); covers peers busy writing a checkpoint"))
        if spec.interface:
            add(EnvVar("HCCL_SOCKET_IFNAME", spec.interface,
                       "HCCL's host-side root NIC; HCCL_IF_IP would need a different IP on every node"))
        env.notes.append("No HCCL_BUFFSIZE: the CANN default (200 MB) is kept until a profile says otherwise.")
    else:
        threads = max(1, spec.cpus // spec.per_node)
        add(EnvVar("OMP_NUM_THREADS", str(threads),
                   f"{spec.cpus} CPUs shared by {spec.per_node} workers; torchrun would otherwise force 1"))
    if spec.interface:
        add(EnvVar("GLOO_SOCKET_IFNAME", spec.interface,
                   "gloo (CPU tensors, object collectives) uses the same NIC"))
    return env


# ---------------------------------------------------------------- rendering


def _header(spec: LaunchSpec, what: str) -> list[str]:
    return [
        f"# {what}",
        f"# Rendered by `hanlin train --print-launch {spec.launcher}`: {spec.nodes} node(s) x "
        f"{spec.per_node} {spec.device} device(s) = {spec.world_size} workers.",
    ]


def _env_sh(spec: LaunchSpec) -> str:
    env = _environment(spec)
    lines = _header(spec, "env.sh: the environment of every training worker. Sourced, not run.")
    if spec.device == "npu":
        lines += [
            "",
            "# CANN (driver runtime, HCCL, op libraries): its set_env.sh sets LD_LIBRARY_PATH,",
            "# PYTHONPATH and ASCEND_* for torch_npu. Default: the toolkit's install path for root;",
            "# a user install lives at $HOME/Ascend/ascend-toolkit/set_env.sh (set CANN_SET_ENV).",
            f'CANN_SET_ENV="${{CANN_SET_ENV:-{CANN_SET_ENV_DEFAULT}}}"',
            'if [ ! -f "$CANN_SET_ENV" ]; then',
            '    echo "env.sh: CANN set_env.sh not found at $CANN_SET_ENV; set CANN_SET_ENV" >&2',
            "    return 1",
            "fi",
            "# set_env.sh reads variables that may be unset: relax `set -u` around it, then restore it.",
            'HANLIN_NOUNSET="${-//[^u]/}"',
            "set +u",
            '. "$CANN_SET_ENV"',
            'if [ -n "$HANLIN_NOUNSET" ]; then set -u; fi',
        ]
    lines.append("")
    for var in env.vars:
        lines.append(f"# {var.why}")
        lines.append(f"export {var.name}={shlex.quote(var.value)}")
    for note in env.notes:
        lines.append(f"# {note}")
    return "\n".join(lines) + "\n"


def _worker_args(spec: LaunchSpec) -> list[str]:
    return ["-m", spec.module, "--config", spec.config, "--resume", spec.resume]


def _torchrun_args(spec: LaunchSpec, endpoint: str, rdzv_id: str) -> str:
    """The torchrun flags, spelled as torch 2.13's parser spells them; endpoint/id are shell words."""
    parts = [
        "--nnodes", str(spec.nodes),
        "--nproc-per-node", str(spec.per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", rdzv_id,
        "--max-restarts", str(spec.max_restarts),
    ]
    quoted = [p if p in (endpoint, rdzv_id) else shlex.quote(p) for p in parts]
    quoted += [shlex.quote(a) for a in _worker_args(spec)]
    return " \\\n    ".join(" ".join(quoted[i:i + 2]) for i in range(0, len(quoted), 2))


_SELF_DIR = 'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"'


def _torchrun_launch(spec: LaunchSpec) -> str:
    if spec.master_addr:
        addr = f'MASTER_ADDR="${{MASTER_ADDR:-{spec.master_addr}}}"'
    else:
        addr = 'MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, reachable from every node}"'
    lines = ["#!/usr/bin/env bash"] + _header(spec, "launch.sh: run this same script on every node (in any order).") + [
        "# The nodes meet at MASTER_ADDR:MASTER_PORT (torchrun's c10d rendezvous, hosted by the",
        "# node whose address that is) and are given their ranks there, so no NODE_RANK is needed.",
        "set -euo pipefail",
        _SELF_DIR,
        '. "$HERE/env.sh"',
        addr,
        f'MASTER_PORT="${{MASTER_PORT:-{spec.master_port}}}"',
        "# Same id on every node of one run; a new id starts a new rendezvous.",
        f'RDZV_ID="${{RDZV_ID:-{spec.job_name}}}"',
        "",
        "exec torchrun \\\n    " + _torchrun_args(spec, '"$MASTER_ADDR:$MASTER_PORT"', '"$RDZV_ID"'),
    ]
    return "\n".join(lines) + "\n"


def _hostfile(spec: LaunchSpec) -> str:
    lines = ["# DeepSpeed hostfile (MPI style): one `hostname slots=devices` line per node."]
    if not spec.hosts:
        lines.append("# PLACEHOLDERS: replace every CHANGE-ME-node-i with a real host name reachable by")
        lines.append("# passwordless ssh from node 0; launch.sh refuses to run until you do.")
    lines += [f"{host} slots={spec.per_node}" for host in spec.host_list]
    return "\n".join(lines) + "\n"


def _deepspeed_env(spec: LaunchSpec) -> str:
    # The runner reads this line by line and splits on the first '='; no comments allowed.
    return "".join(f"{v.name}={v.value}\n" for v in environment(spec))


def _deepspeed_launch(spec: LaunchSpec) -> str:
    addr = spec.master_addr or spec.host_list[0]
    worker = " ".join(shlex.quote(a) for a in [spec.module, "--config", spec.config, "--resume", spec.resume])
    lines = ["#!/usr/bin/env bash"] + _header(spec, "launch.sh: run once, on node 0 (the first host in hostfile).") + [
        "# The deepspeed runner ssh-es (pdsh) into every host in the hostfile, exports the",
        "# variables in .deepspeed_env there, and starts the workers with RANK/LOCAL_RANK set.",
        "# Needs: passwordless ssh between nodes, pdsh, and this folder at the same path on all.",
        "set -euo pipefail",
        _SELF_DIR,
        'if grep -q "CHANGE-ME" "$HERE/hostfile"; then',
        '    echo "launch.sh: edit $HERE/hostfile: it still holds CHANGE-ME placeholder hosts" >&2',
        "    exit 1",
        "fi",
        '. "$HERE/env.sh"',
        "# The runner reads .deepspeed_env from ~ and the working directory; point it here instead.",
        'export DS_ENV_FILE="$HERE/.deepspeed_env"',
        f'MASTER_ADDR="${{MASTER_ADDR:-{addr}}}"',
        f'MASTER_PORT="${{MASTER_PORT:-{spec.master_port}}}"',
        "",
        "exec deepspeed \\",
        '    --hostfile "$HERE/hostfile" \\',
        f"    --num_nodes {spec.nodes} --num_gpus {spec.per_node} \\",
        '    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \\',
        "    --launcher pdsh \\",
        f"    --module {worker}",
    ]
    return "\n".join(lines) + "\n"


def _sbatch(spec: LaunchSpec) -> str:
    opts = [
        ("job-name", spec.job_name),
        ("nodes", str(spec.nodes)),
        ("ntasks-per-node", "1"),
        ("cpus-per-task", str(spec.cpus)),
        ("time", spec.time_limit),
        ("output", "%x-%j.out"),
    ]
    if spec.partition:
        opts.append(("partition", spec.partition))
    if spec.gres:
        opts.append(("gres", spec.gres))
    elif spec.device == "cuda":
        opts.append(("gpus-per-node", str(spec.per_node)))
    elif spec.device == "npu":
        opts.append(("gres", f"npu:{spec.per_node}"))
    lines = ["#!/usr/bin/env bash"]
    lines += [f"#SBATCH --{name}={value}" for name, value in opts]
    lines += _header(spec, "train.sbatch: submit with `sbatch train.sbatch` from the folder holding env.sh.")
    lines += [
        "# One task per node: each task is a torchrun that starts this node's workers.",
    ]
    if spec.device == "npu" and not spec.gres:
        lines.append("# --gres=npu:N assumes the cluster's gres.conf names Ascend devices `npu`; adjust if not.")
    lines += [
        "set -euo pipefail",
        "# sbatch runs a copy of this script from its spool folder, so find env.sh via the submit dir.",
        'LAUNCH_DIR="${LAUNCH_DIR:-$SLURM_SUBMIT_DIR}"',
        '. "$LAUNCH_DIR/env.sh"',
        "# The batch script runs on the first node of the allocation; it hosts the rendezvous.",
        "# Not `| head -n 1`: under pipefail, head closing the pipe early can kill scontrol",
        "# with SIGPIPE and abort the job, so take the first line in bash instead.",
        'NODE_NAMES="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"',
        "MASTER_ADDR=\"${NODE_NAMES%%$'\\n'*}\"",
        f"MASTER_PORT={spec.master_port}",
        "export MASTER_ADDR MASTER_PORT",
        "",
        "# srun copies this environment (env.sh included) to every node: --export=ALL is its default.",
        f"srun --nodes={spec.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        "    torchrun \\\n    " + _torchrun_args(spec, '"$MASTER_ADDR:$MASTER_PORT"', '"$SLURM_JOB_ID"'),
    ]
    return "\n".join(lines) + "\n"


def render(spec: LaunchSpec) -> dict[str, str]:
    """File name -> contents for `spec.launcher`; nothing is written."""
    files = {"env.sh": _env_sh(spec)}
    if spec.launcher == "torchrun":
        files["launch.sh"] = _torchrun_launch(spec)
    elif spec.launcher == "deepspeed":
        files["hostfile"] = _hostfile(spec)
        files[".deepspeed_env"] = _deepspeed_env(spec)
        files["launch.sh"] = _deepspeed_launch(spec)
    else:
        files["train.sbatch"] = _sbatch(spec)
    return files


def write(files: dict[str, str], out_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write each file atomically (temp file + rename) into out_dir; scripts get mode 0755.

    Refuses, before writing anything, if any target exists and force is False.
    """
    out = Path(out_dir)
    for name in files:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"write: file name {name!r} must be a plain name inside out_dir")
    out.mkdir(parents=True, exist_ok=True)
    existing = [name for name in files if (out / name).exists()]
    if existing and not force:
        raise FileExistsError(f"write: {', '.join(existing)} already exist in {out}; pass force=True to overwrite")
    paths = []
    for name, text in files.items():
        target = out / name
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755 if name in EXECUTABLE else 0o644)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        paths.append(target)
    return paths
