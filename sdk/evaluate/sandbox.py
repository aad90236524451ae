"""Run untrusted, model-written Python in a throw-away sandbox.

Used by the code-execution benchmarks (HumanEval completions plus their tests) and by the
agents' Python tool:

    from hanlin.evaluate.sandbox import Limits, run_python
    result = run_python("print(1 + 1)", limits=Limits(wall_seconds=5))
    result.status, result.stdout        # ("passed", "2\\n")

    # files the program starts with, in its working directory (a copy: changes are lost)
    run_python("print(open('data/x.csv').read())", files={"data/x.csv": "a,b\\n1,2\\n"})

Each run is one fresh interpreter process (the same `sys.executable`) in its own temporary
directory, which is deleted afterwards. What keeps the code in its box:

- Limits: `resource.setrlimit` in the child before it executes anything: address space
  (RLIMIT_AS), CPU seconds, size of any file written, number of processes, no core files.
  The child leads a new session, so on a wall-clock timeout the whole process group is
  SIGKILLed, and after every run the group (and any stray process still carrying the run's
  marks) is swept away.
- Identity: when the harness runs as root (CI, containers) the child drops to the `nobody`
  user. Root is exempt from RLIMIT_NPROC, so without this a fork bomb would not be
  bounded; as nobody the code also cannot signal the harness or read root-only files.
  If the interpreter lives somewhere nobody cannot enter (pyenv under /root), the child
  gets a private mount namespace in which that directory is covered by an empty tmpfs
  and only the interpreter's own directories are mounted back, at the same paths.
- Network: a new, empty network namespace (`unshare(CLONE_NEWNET)`; a non-root user
  needs a user namespace along with it). No interfaces at all, so not even a server on
  the host's loopback is reachable. Where namespaces are unavailable, the code file
  starts with a line that makes `socket.socket` and friends raise OSError: a guard
  against accidental network use, not a security boundary.
- Environment: built from scratch (PATH, LANG/LC_ALL, HOME, PYTHONDONTWRITEBYTECODE,
  PYTHONHASHSEED), so no secret of the harness's environment leaks in.

`isolation()` says which of these this machine gives. The standard library is all this
module uses.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import math
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

OUTPUT_CAP = 64 * 1024  # bytes of stdout / stderr kept per run
NOBODY_FALLBACK = 65534  # uid and gid of nobody when the passwd / group files lack it
SCRIPT_NAME = "main.py"

# flags from <sched.h> and <sys/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# Where namespaces are unavailable the code file gets this one line (after any docstring
# and `from __future__` imports, which must stay first). It runs in its own namespace, so
# the program's globals stay clean. A socket wrapping an existing descriptor (fileno=...)
# is still allowed: that is how socket.socketpair() works, which asyncio needs.
_SOCKET_GUARD_SOURCE = '''
import socket, _socket
def refuse(*args, **kwargs):
    raise OSError("network is disabled in the sandbox")
class NoNetworkSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            refuse()
        super().__init__(family, type, proto, fileno)
socket.socket = _socket.socket = socket.SocketType = NoNetworkSocket
socket.create_connection = socket.create_server = refuse
'''
_SOCKET_GUARD_LINE = f"exec({_SOCKET_GUARD_SOURCE!r}, {{}})  # hanlin sandbox: no network\n"

# the last line of a traceback that ran out of memory, or the errno text of ENOMEM
_MEMORY_ERROR = re.compile(r"(?m)^(?:\w+\.)*MemoryError\b|\[Errno 12\] Cannot allocate memory")


@dataclass(frozen=True)
class Limits:
    """What one run may use. All values must be positive."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 512  # address space (RLIMIT_AS)
    processes: int = 16  # max processes (and threads) of the sandbox user (RLIMIT_NPROC)
    file_mb: int = 16  # max size of any file written, stdout and stderr included (RLIMIT_FSIZE)

    def __post_init__(self) -> None:
        wall = self.wall_seconds
        number = isinstance(wall, (int, float)) and not isinstance(wall, bool)
        if not (number and math.isfinite(wall) and wall > 0):
            raise ValueError(f"Limits.wall_seconds must be a positive number of seconds, got {wall!r}")
        for name in ("cpu_seconds", "memory_mb", "processes", "file_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """How one run ended. `status` is one of:

    passed   exited 0 within the limits (then `ok` is True)
    failed   exited with a nonzero code (an uncaught exception, a failed assert)
    timeout  ran past the wall-clock or CPU-time limit and was killed
    memory   a MemoryError, ENOMEM, or a SIGKILL from the kernel (the OOM killer)
    killed   ended by another signal (SIGSEGV, SIGABRT, ...)
    error    the sandbox itself could not start the program (`stderr` says why)
    """

    ok: bool
    status: str
    returncode: int | None  # negative: killed by that signal
    stdout: str  # the first OUTPUT_CAP bytes, decoded as UTF-8
    stderr: str
    seconds: float  # wall-clock seconds from start to exit
    isolation: dict[str, str] = field(default_factory=dict)  # what applied to this run


def run_python(
    code: str, *, limits: Limits = Limits(), stdin: str = "", files: Mapping[str, str | bytes] | None = None
) -> RunResult:
    """Run `code` as a Python program in a fresh sandbox and report how it ended.

    `files` maps relative paths ("data/x.csv") to contents (str is written as UTF-8): they
    are written into the throwaway working directory before the run, owned by the sandbox
    user, so the program reads its inputs without being given any path outside its box.

    Never raises for anything the program does; a sandbox that cannot start gives
    status "error". The interpreter runs with `-s -P` (no user site, no script directory
    on sys.path): that is `python -I` minus `-E`, which would make it ignore the
    PYTHONHASHSEED=0 of the environment we build from scratch anyway.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
    return _execute(code, limits, stdin, _plan(), _checked_files(files))


def _checked_files(files: Mapping[str, str | bytes] | None) -> dict[str, bytes]:
    """`files` as {relative path: bytes}, or a ValueError naming the path that cannot be one."""
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise TypeError(f"files must be a mapping of relative paths to contents, got {type(files).__name__}")
    out: dict[str, bytes] = {}
    for name, data in files.items():
        if not isinstance(name, str):
            raise TypeError(f"files: a path must be a str, got {type(name).__name__}")
        parts = name.split("/")
        if name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"files: {name!r} must be a relative path without '.', '..' or empty parts, like 'data/x.csv'")
        if name == SCRIPT_NAME:
            raise ValueError(f"files: {SCRIPT_NAME!r} is the name of the sandbox's own script; rename that file")
        if isinstance(data, str):
            data = data.encode("utf-8", errors="surrogateescape")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"files: the contents of {name!r} must be str or bytes, got {type(data).__name__}")
        out[name] = bytes(data)
    folders = {"/".join(name.split("/")[:i]) for name in out for i in range(1, name.count("/") + 1)}
    clash = sorted(folders & set(out))
    if clash:
        raise ValueError(f"files: {clash[0]!r} is given both as a file and as a folder of other files")
    return out


def _place_files(workspace: str, files: dict[str, bytes]) -> None:
    """Write the run's starting files into its fresh working directory."""
    for name, data in files.items():
        path = os.path.join(workspace, *name.split("/"))
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(data)


def isolation() -> dict[str, str]:
    """What isolation this machine gives a run (probed once, then cached).

    Keys: "network" ("netns" or "socket-refused"), "user" ("nobody" or "same"),
    "processes" (whether RLIMIT_NPROC bounds the sandbox), "filesystem", "limits",
    and "note" when something was unavailable.
    """
    plan = _plan()
    report = {
        "network": "netns" if plan.netns else "socket-refused",
        "user": "nobody" if plan.uid is not None else "same",
        "processes": (
            "RLIMIT_NPROC enforced for nobody"
            if plan.uid is not None
            else "RLIMIT_NPROC not enforced (running as root)"
            if os.geteuid() == 0
            else "RLIMIT_NPROC counts all of this user's processes"
        ),
        "filesystem": "fresh temporary working directory; other files per the user's permissions"
        + ("; interpreter re-mounted over a tmpfs hiding " + ", ".join(plan.hidden) if plan.hidden else ""),
        "limits": "RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE=0; wall clock",
    }
    if plan.note:
        report["note"] = plan.note
    return report


# ---------------------------------------------------------------------------------------
# The plan: which isolation steps this machine supports, decided once per process.


@dataclass(frozen=True)
class _Plan:
    netns: bool  # put the child in a new network namespace
    userns: bool  # ... together with a new user namespace (non-root only)
    uid: int | None  # drop to this user and group (root only); None: stay who we are
    gid: int | None
    expose: tuple[str, ...] = ()  # interpreter directories to mount back for the child
    hidden: tuple[str, ...] = ()  # directories it cannot enter, covered by a tmpfs
    note: str = ""  # why a step is missing


@functools.lru_cache(maxsize=1)
def _plan() -> _Plan:
    if os.geteuid() != 0:
        netns = _can_unshare(CLONE_NEWUSER | CLONE_NEWNET)
        note = "" if netns else "no user namespaces here: sockets are refused in-process"
        return _Plan(netns=netns, userns=netns, uid=None, gid=None, note=note)

    netns = _can_unshare(CLONE_NEWNET)
    uid, gid = _nobody()
    expose, hidden = _unreachable_interpreter_dirs(uid, gid)
    plan = _Plan(netns=netns, userns=False, uid=uid, gid=gid, expose=expose, hidden=hidden)
    if not netns:
        plan = replace(plan, note="cannot unshare a network namespace: sockets are refused in-process")
    # the end-to-end check: can nobody start this interpreter, with these steps?
    try:
        probe = _execute("import encodings, socket", Limits(wall_seconds=30), "", plan)
        if probe.status == "passed":
            return plan
        reason = (probe.stderr.strip().splitlines() or [probe.status])[-1]
    except OSError as exc:  # say, chown to an unmapped uid inside a user namespace
        reason = str(exc)
    return replace(
        plan, uid=None, gid=None, expose=(), hidden=(),
        note=(plan.note + "; " if plan.note else "") + f"cannot run as nobody ({reason}): runs as root",
    )  # fmt: skip


def _nobody() -> tuple[int, int]:
    """uid and gid of the `nobody` user (65534 where the passwd file lacks it)."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    for group in ("nogroup", "nobody"):  # Debian's name, then everyone else's
        try:
            return NOBODY_FALLBACK, grp.getgrnam(group).gr_gid
        except KeyError:
            continue
    return NOBODY_FALLBACK, NOBODY_FALLBACK


def _unreachable_interpreter_dirs(uid: int, gid: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The interpreter directories nobody cannot reach, and the ancestors that block them."""
    prefixes = (sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix)
    roots = {os.path.realpath(p) for p in prefixes}
    roots.add(os.path.dirname(os.path.realpath(sys.executable)))
    # keep only the outermost of nested directories
    roots = sorted(roots)
    outer = [r for r in roots if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in roots)]
    expose, hidden = [], set()
    for root in outer:
        parts = root.split("/")
        for depth in range(2, len(parts) + 1):
            ancestor = "/".join(parts[:depth])
            if not _enterable(ancestor, uid, gid):
                expose.append(root)
                hidden.add(ancestor)
                break
    # a hidden directory inside another hidden one disappears under the outer tmpfs
    hidden_list = sorted(hidden)
    hidden_list = [h for h in hidden_list if not any(h.startswith(o + "/") for o in hidden_list)]
    return tuple(expose), tuple(hidden_list)


def _enterable(path: str, uid: int, gid: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _unshare(flags: int) -> int:
    """unshare(2); returns 0 or the errno."""
    return 0 if _libc().unshare(flags) == 0 else ctypes.get_errno()


def _can_unshare(flags: int) -> bool:
    """Try unshare(flags) in a throw-away child, so this process stays as it is."""
    _libc()  # load it here, not in the child
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if _unshare(flags) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if _libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


# ---------------------------------------------------------------------------------------
# One run.


def _execute(code: str, limits: Limits, stdin: str, plan: _Plan, files: dict[str, bytes] | None = None) -> RunResult:
    start = time.monotonic()
    # ours: output files, the child's notes, mount staging points; the sandbox never sees it
    harness = tempfile.mkdtemp(prefix="hanlin-harness-")
    # theirs: the working directory, owned by the sandbox user
    workspace = tempfile.mkdtemp(prefix="hanlin-sandbox-")
    try:
        _place_files(workspace, files or {})
        script = os.path.join(workspace, SCRIPT_NAME)
        with open(script, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(code if plan.netns else _with_socket_guard(code))
        if plan.uid is not None:
            for root, dirs, names in os.walk(workspace):  # the script, the files, their folders
                for name in dirs + names:
                    os.lchown(os.path.join(root, name), plan.uid, plan.gid)
            os.chown(workspace, plan.uid, plan.gid)
        os.chmod(workspace, 0o700)
        stages = []
        for i in range(len(plan.expose)):
            stages.append(os.path.join(harness, f"stage{i}"))
            os.mkdir(stages[-1])

        paths = {name: os.path.join(harness, name) for name in ("stdin", "stdout", "stderr", "notes")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        with (
            open(paths["stdin"], "rb") as fin,
            open(paths["stdout"], "wb") as fout,
            open(paths["stderr"], "wb") as ferr,
            open(paths["notes"], "wb") as fnotes,
        ):
            _libc()  # loaded before the fork: the child must not dlopen
            # preexec_fn, not Popen(user=, group=): those drop privileges before it runs,
            # and the namespaces and mounts need root. It only makes system calls.
            enter = functools.partial(_enter_sandbox, plan, limits, tuple(stages), fnotes.fileno())
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-s", "-P", SCRIPT_NAME],
                    cwd=workspace,
                    env=_environment(workspace),
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=enter,  # noqa: PLW1509
                )
            except (OSError, subprocess.SubprocessError) as exc:
                notes = _read_notes(paths["notes"])
                detail = notes.get("error", str(exc))
                return RunResult(False, "error", None, "", f"sandbox could not start: {detail}",
                                 time.monotonic() - start, notes)  # fmt: skip

        # The leader is only reaped at the end: until then its pid, which names the
        # process group, cannot be reused, so killpg cannot hit anyone else's group.
        try:
            timed_out = not _wait_exit(proc.pid, start + limits.wall_seconds)
            if timed_out:
                _kill_group(proc.pid)
                _wait_exit(proc.pid, None)
            seconds = time.monotonic() - start
            _sweep(proc.pid, workspace, plan.uid if plan.uid is not None else os.getuid())
        except BaseException:  # interrupted (Ctrl-C): leave nothing running
            _kill_group(proc.pid)
            proc.wait()
            raise
        _, wait_status, usage = os.wait4(proc.pid, 0)
        returncode = proc.returncode = os.waitstatus_to_exitcode(wait_status)  # Popen: done
        cpu = usage.ru_utime + usage.ru_stime

        stdout = _read_capped(paths["stdout"])
        stderr = _read_capped(paths["stderr"])
        status = _classify(returncode, timed_out, cpu, limits, stderr)
        applied = _read_notes(paths["notes"])
        if not plan.netns:
            applied["network"] = "socket-refused"
        return RunResult(status == "passed", status, returncode, stdout, stderr, seconds, applied)
    finally:
        _remove_tree(workspace)
        _remove_tree(harness)


def _with_socket_guard(code: str) -> str:
    """Insert the socket guard line after the docstring and `from __future__` imports."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return code  # it will not run anyway; keep its error's line numbers right
    after = 0
    for i, node in enumerate(body):
        docstring = (
            i == 0 and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        )  # fmt: skip
        future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if not (docstring or future):
            break
        after = node.end_lineno or after
    lines = code.splitlines(keepends=True)
    if after and not lines[after - 1].endswith("\n"):
        lines[after - 1] += "\n"
    return "".join(lines[:after]) + _SOCKET_GUARD_LINE + "".join(lines[after:])


def _environment(workspace: str) -> dict[str, str]:
    """A fresh environment: nothing of the harness's (its tokens, keys) is inherited."""
    return {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workspace,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _enter_sandbox(plan: _Plan, limits: Limits, stages: tuple[str, ...], notes_fd: int) -> None:
    """preexec_fn: runs in the forked child, after setsid() and chdir(), before exec.

    Order matters: namespaces and mounts need root, so they come before the drop to
    nobody; the rlimits come last. A missing network namespace is recorded, not fatal
    (isolation() already reported it); a failed drop to nobody is fatal (status "error"),
    since the plan probed that it works and running as root instead would lift the
    process limit silently.
    """

    def note(key: str, value: str) -> None:
        os.write(notes_fd, f"{key}={value}\n".encode())

    try:
        os.umask(0o022)
        if plan.netns:
            flags = CLONE_NEWUSER | CLONE_NEWNET if plan.userns else CLONE_NEWNET
            err = _unshare(flags)
            note("network", "netns" if err == 0 else f"open (unshare: {os.strerror(err)})")
        if plan.expose:
            _expose_interpreter(plan, stages)
            note("filesystem", "interpreter re-mounted; hidden: " + ", ".join(plan.hidden))
        if plan.uid is not None:
            os.setgroups([])
            os.setgid(plan.gid)
            os.setuid(plan.uid)
            note("user", "nobody")
        else:
            note("user", "same")
        _set_limits(limits)
        os.umask(0o077)
    except BaseException as exc:
        note("error", f"{type(exc).__name__}: {exc}")
        raise


def _expose_interpreter(plan: _Plan, stages: tuple[str, ...]) -> None:
    """In a private mount namespace, cover the directories nobody cannot enter (say /root)
    with an empty tmpfs and mount the interpreter's directories back at their own paths:
    the binary's RUNPATH and sys.prefix stay valid, and the rest stays invisible."""
    err = _unshare(CLONE_NEWNS)
    if err:
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do leaks to the host
    for path, stage in zip(plan.expose, stages):
        _mount(path, stage, None, MS_BIND | MS_REC)
    for hidden in plan.hidden:
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    for path, stage in zip(plan.expose, stages):
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(stage, path, None, MS_MOVE)


def _set_limits(limits: Limits) -> None:
    def cap(res: int, value: int, hard: int | None = None) -> None:
        hard = value if hard is None else hard
        _, current_hard = resource.getrlimit(res)
        if current_hard != resource.RLIM_INFINITY:  # an unprivileged user cannot raise it
            value, hard = min(value, current_hard), min(hard, current_hard)
        resource.setrlimit(res, (value, hard))

    cap(resource.RLIMIT_CORE, 0)
    # SIGXCPU at the soft limit, SIGKILL a second later if the program ignores it
    cap(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)
    cap(resource.RLIMIT_FSIZE, limits.file_mb << 20)
    cap(resource.RLIMIT_NPROC, limits.processes)
    cap(resource.RLIMIT_AS, limits.memory_mb << 20)


def _wait_exit(pid: int, deadline: float | None) -> bool:
    """Wait until the child exits (True) or `deadline` passes (False), without reaping it.

    Own polling rather than Popen.wait: the final wait4 also gives the CPU time, which
    tells a SIGKILL at the hard CPU limit from one by the OOM killer."""
    flags = os.WEXITED | os.WNOWAIT
    if deadline is None:
        os.waitid(os.P_PID, pid, flags)
        return True
    delay = 0.001
    while os.waitid(os.P_PID, pid, flags | os.WNOHANG) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep(pgid: int, workspace: str, uid: int) -> None:
    """SIGKILL whatever the run left behind, then wait (at most 5 s) until it is gone.

    "The run's" means: of the sandbox user, and in its process group or session, or, for a
    process that left them (setsid), still carrying its HOME or working directory. Even
    dead, a process counts against the sandbox user's RLIMIT_NPROC until it is reaped, so
    without the wait the next run might not be able to fork. Orphans are reaped by init;
    those that are our own children (this process is init, as PID 1 in a container) we
    reap here. The leader `pgid` itself is left for the caller to reap."""
    marks = (pgid, f"HOME={workspace}".encode(), workspace)
    killed: set[int] = set()  # dead ones show no HOME or working directory: remember them
    deadline = time.monotonic() + 5.0
    while True:
        _kill_group(pgid)
        left = 0
        for pid in _pids_of(uid):
            found = _run_process(pid, marks, pid in killed) if pid != pgid else None
            if found is None:
                continue
            left += 1
            state, ppid = found
            try:
                if state not in ("Z", "X"):
                    killed.add(pid)
                    os.kill(pid, signal.SIGKILL)
                elif ppid == os.getpid():
                    os.waitpid(pid, os.WNOHANG)
            except (ProcessLookupError, ChildProcessError, PermissionError):
                pass
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _run_process(pid: int, marks: tuple[int, bytes, str], known: bool) -> tuple[str, int] | None:
    """(state, parent pid) of `pid` if it is `known` or carries one of the run's marks."""
    pgid, home, workspace = marks
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        state, ppid, pgrp, session = fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])
        if known or pgid in (pgrp, session):
            return state, ppid
        if state in ("Z", "X"):
            return None  # a dead process shows neither environment nor working directory
        with open(f"/proc/{pid}/environ", "rb") as f:
            if home in f.read().split(b"\0"):
                return state, ppid
        cwd = os.readlink(f"/proc/{pid}/cwd")
        if cwd == workspace or cwd.startswith(workspace + "/"):
            return state, ppid
    except (OSError, IndexError, ValueError):
        pass
    return None


def _pids_of(uid: int) -> list[int]:
    pids = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return pids
    for name in names:
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                continue
    return pids


def _classify(returncode: int, timed_out: bool, cpu: float, limits: Limits, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if _MEMORY_ERROR.search(stderr):
        return "memory"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_seconds):
            return "timeout"  # the CPU-time limit
        if sig == signal.SIGKILL:
            return "memory"  # nobody else sends it: the kernel's OOM killer
        return "killed"
    return "failed"


def _read_capped(path: str, cap: int = OUTPUT_CAP) -> str:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    text = data[:cap].decode("utf-8", errors="replace")
    if len(data) > cap:
        text += f"\n[... output truncated at {cap} bytes]"
    return text


def _read_notes(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _remove_tree(path: str) -> None:
    """Delete a run's directory. Root needs no help; as the same user, directories the
    program chmod'ed shut are opened first (real directories only, never through one of
    the symlinks it may have planted; shutil.rmtree does not follow them either)."""
    if not os.path.lexists(path):
        return
    if os.geteuid() != 0:
        _open_directory(path)
        for root, dirs, _ in os.walk(path):  # top-down: each directory is opened before entered
            for name in dirs:
                _open_directory(os.path.join(root, name))
    shutil.rmtree(path, ignore_errors=True)


def _open_directory(path: str) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):  # a symlink to a directory is left alone
            os.chmod(path, 0o700)
    except OSError:
        pass
