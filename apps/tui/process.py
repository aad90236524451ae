"""A `hanlin` command the app runs as a child process (the server, the fine-tuner), which must
not outlive the app."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
import weakref
from pathlib import Path


_LIVE: "weakref.WeakSet[ChildProcess]" = weakref.WeakSet()


class ChildProcess:
    """A `hanlin` command the app started: stdin closed, stdout and stderr into log_path (the
    terminal belongs to Textual), stopped with SIGTERM and killed if it lingers."""

    def __init__(self, args: list[str], log_path: Path, *, env: dict[str, str] | None = None, append: bool = False):
        self.args, self.log_path = list(args), Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        with open(self.log_path, "ab" if append else "wb") as out:
            if append:
                out.write(f"\n--- {' '.join(args[1:])}\n".encode())
                out.flush()
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        self.started = time.monotonic()
        self.stop_asked = False
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM): the server shuts down, the fine-tuner saves a checkpoint."""
        if self.running:
            self.stop_asked = True
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
        self.proc.wait()

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL when it has not exited after `grace` seconds; its exit code."""
        self.terminate()
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def error_line(self) -> str | None:
        """The CLI's one-sentence error ("hanlin: error: ...") from the end of the log, if any."""
        for line in reversed(self.tail(40).splitlines()):
            if line.startswith("hanlin: error: "):
                return line.removeprefix("hanlin: error: ")
        return None

    def tail(self, lines: int = 12) -> str:
        """The last lines of its log: what a failure is explained by."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        rows = [r for r in text.replace("\r", "\n").splitlines() if r.strip()]
        return "\n".join(rows[-lines:])


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when the app ended without its cleanups (a crash): no orphan processes."""
    for child in list(_LIVE):
        try:
            child.kill()
        except OSError:
            pass


