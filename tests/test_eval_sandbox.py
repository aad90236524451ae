"""hanlin.evaluate.sandbox really holds: limits, timeouts, process clean-up, no network, no
secrets, no reaching outside. Each test runs real untrusted-style programs; small limits
keep the file to a few seconds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from hanlin.evaluate import sandbox
from hanlin.evaluate.sandbox import Limits, isolation, run_python

SMALL = Limits(wall_seconds=4, cpu_seconds=4, memory_mb=256)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the drop to nobody needs root")


def _processes_of(uid: int) -> list[str]:
    """Processes of `uid`, zombies included (they still count against RLIMIT_NPROC),
    as 'pid (command) state' lines."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        found.append(stat.rsplit(")", 1)[0] + ") " + stat.rsplit(")", 1)[1].split()[0])
    return found


def test_passing_and_failing_programs():
    code = "import sys\nprint('hello', input())\nprint('warn', file=sys.stderr)"
    ok = run_python(code, limits=SMALL, stdin="world\n")
    assert ok.ok and ok.status == "passed" and ok.returncode == 0
    assert ok.stdout == "hello world\n" and ok.stderr == "warn\n"
    assert 0 < ok.seconds < SMALL.wall_seconds

    code = "def add(a, b):\n    return a - b\n\nassert add(2, 2) == 4, 'add is wrong'\n"
    bad = run_python(code, limits=SMALL)
    assert not bad.ok and bad.status == "failed" and bad.returncode == 1
    assert "AssertionError: add is wrong" in bad.stderr


def test_infinite_loop_times_out_on_the_wall_clock():
    limits = Limits(wall_seconds=3, cpu_seconds=30, memory_mb=256)
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", limits=limits)
    elapsed = time.monotonic() - start
    assert not result.ok and result.status in ("timeout", "killed"), result
    assert elapsed < limits.wall_seconds + 2, elapsed


def test_cpu_limit_ends_a_busy_program_before_the_wall_clock():
    limits = Limits(wall_seconds=8, cpu_seconds=1, memory_mb=256)
    result = run_python("while True:\n    pass\n", limits=limits)
    assert not result.ok and result.status == "timeout", result
    assert result.seconds < 4, result.seconds


@as_root
def test_fork_bomb_is_bounded_and_cleaned_up():
    uid = sandbox._plan().uid
    assert uid is not None, isolation()
    before = set(_processes_of(uid))
    limits = Limits(wall_seconds=3, cpu_seconds=10, memory_mb=256, processes=16)
    start = time.monotonic()
    bomb = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"
    result = run_python(bomb, limits=limits)
    assert not result.ok, result
    assert time.monotonic() - start < limits.wall_seconds + 3
    left = [p for p in _processes_of(uid) if p not in before]
    assert not left, f"processes of the sandbox user left behind: {left}"
    after = run_python("print('still fine')", limits=SMALL)
    assert after.ok and after.stdout == "still fine\n", after


@as_root
def test_escaped_process_is_swept():
    """A child that leaves the process group (setsid) and sleeps is still killed."""
    uid = sandbox._plan().uid
    before = set(_processes_of(uid))
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    result = run_python(code, limits=SMALL)
    assert result.ok, result
    assert [p for p in _processes_of(uid) if p not in before] == []


def test_unbounded_allocation_is_a_memory_status():
    result = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", limits=SMALL)
    assert not result.ok and result.status == "memory", result
    assert "MemoryError" in result.stderr


@pytest.fixture
def tcp_server():
    """A real server on the host's loopback; yields (port, list of accepted peers)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(str(peer))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    server.close()


def _client(port: int) -> str:
    return (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        "    print('CONNECTED')\n"
        "except OSError as exc:\n"
        "    print('no network:', exc)\n"
        "    raise\n"
    )


def test_network_is_unreachable(tcp_server):
    port, accepted = tcp_server
    # control: the same client, unsandboxed, does reach the server
    plain = subprocess.run([sys.executable, "-c", _client(port)], capture_output=True, text=True, timeout=10, check=False)
    assert "CONNECTED" in plain.stdout and len(accepted) == 1, plain

    result = run_python(_client(port), limits=SMALL)
    assert "CONNECTED" not in result.stdout and not result.ok, result
    assert "no network:" in result.stdout
    assert len(accepted) == 1, accepted
    if os.geteuid() == 0:
        assert isolation()["network"] == "netns"
        assert result.isolation["network"] == "netns"
    else:
        assert isolation()["network"] in ("netns", "socket-refused")


def test_socket_guard_fallback(tcp_server, monkeypatch):
    """Where namespaces are missing, the prepended guard refuses sockets, and leaves
    docstrings, `from __future__` imports and socket-subclassing modules working."""
    port, accepted = tcp_server
    no_namespaces = replace(sandbox._plan(), netns=False, userns=False)
    monkeypatch.setattr(sandbox, "_plan", lambda: no_namespaces)
    code = '"""Doc."""\nfrom __future__ import annotations\nimport ssl, urllib.request\nprint(__doc__)\n'
    result = run_python(code + _client(port), limits=SMALL)
    assert result.stdout.startswith("Doc.\n") and "CONNECTED" not in result.stdout, result
    assert "network is disabled in the sandbox" in result.stdout and not result.ok
    assert accepted == [] and result.isolation["network"] == "socket-refused"


@as_root
def test_no_secrets_files_or_environment(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)
    monkeypatch.setenv("HANLIN_TEST_SECRET", "s3cret")
    code = (
        "import json, os\n"
        "st = os.stat('.')\n"
        "print(json.dumps({'env': dict(os.environ), 'uid': os.getuid(), 'cwd_uid': st.st_uid,\n"
        "                  'cwd_mode': oct(st.st_mode & 0o777), 'cwd': os.getcwd(),\n"
        "                  'hash': hash('abc')}))\n"
        f"print(open({str(secret)!r}).read())\n"
    )
    result = run_python(code, limits=SMALL)
    assert not result.ok and "PermissionError" in result.stderr, result
    assert "TOPSECRET" not in result.stdout
    seen = json.loads(result.stdout.splitlines()[0])
    assert set(seen["env"]) == {"PATH", "LANG", "LC_ALL", "HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED"}
    assert "s3cret" not in result.stdout and seen["env"]["HOME"] == seen["cwd"]
    assert seen["uid"] == seen["cwd_uid"] == 65534 and seen["cwd_mode"] == "0o700"
    again = json.loads(run_python(code, limits=SMALL).stdout.splitlines()[0])
    assert again["hash"] == seen["hash"], "PYTHONHASHSEED=0 should make str hashes repeatable"


@as_root
def test_cannot_kill_the_harness():
    # signal 0 first: the permission check without the kill, so a broken sandbox fails
    # this test instead of killing the test run
    code = (
        "import os, signal\n"
        "try:\n"
        f"    os.kill({os.getpid()}, 0)\n"
        "    print('CAN SIGNAL THE HARNESS')\n"
        "except PermissionError:\n"
        f"    os.kill({os.getpid()}, signal.SIGKILL)\n"
    )
    result = run_python(code, limits=SMALL)
    assert "CAN SIGNAL" not in result.stdout and not result.ok, result
    assert "PermissionError" in result.stderr


def test_huge_file_is_refused_and_workspace_removed():
    code = "import os\nprint(os.getcwd(), flush=True)\nopen('f', 'wb').write(b'0' * (64 << 20))\n"
    result = run_python(code, limits=Limits(wall_seconds=5, memory_mb=256, file_mb=16))
    assert not result.ok and result.status in ("failed", "killed"), result
    assert "File too large" in result.stderr or result.returncode < 0
    workspace = result.stdout.strip()
    assert workspace.startswith("/") and not os.path.exists(workspace)


def test_output_is_capped():
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n", limits=SMALL)
    assert not result.ok
    assert len(result.stdout) <= sandbox.OUTPUT_CAP + 100
    assert result.stdout.endswith(f"[... output truncated at {sandbox.OUTPUT_CAP} bytes]")


@pytest.mark.parametrize(
    "field, value",
    [("wall_seconds", 0), ("wall_seconds", float("nan")), ("cpu_seconds", -1), ("memory_mb", 0),
     ("processes", 0), ("file_mb", 1.5)],
)  # fmt: skip
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})
