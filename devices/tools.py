"""Running vendor tools and reading /proc files without ever raising.

A probe that cannot run its tool has learned something ("nvidia-smi not on PATH"), and that
sentence is what the user sees in `hanlin devices` and in DeviceNotFound; so failures come back
as reasons, never as exceptions.
"""

from __future__ import annotations

import shutil
import subprocess

TOOL_TIMEOUT_S = 5.0


def installed(module: str) -> bool:
    """Whether `module` could be imported, without importing it. A broken install, or one
    blocked with sys.modules[name] = None, counts as not installed."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_tool(command: list[str], timeout: float = TOOL_TIMEOUT_S) -> tuple[str | None, str | None]:
    """Run `command` and return (stdout, None), or (None, why it gave nothing usable).

    The executable is looked up with shutil.which first so "not installed" reads differently from
    "installed but failing" (a driver/library mismatch makes nvidia-smi exit 9 with a message that
    is worth showing). A hung tool is killed after `timeout` seconds.
    """
    name = command[0]
    exe = shutil.which(name)
    if exe is None:
        return None, f"{name} not on PATH"
    try:
        proc = subprocess.run(
            [exe, *command[1:]], capture_output=True, text=True, errors="replace", timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"{name} did not answer within {timeout:g} s"
    except (OSError, ValueError) as e:
        return None, f"{name} could not be run: {e}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        return None, f"{name} failed (exit {proc.returncode}): {lines[0].strip() if lines else 'no output'}"
    return proc.stdout, None


def read_text(path: str) -> str | None:
    """The file's text, or None when it is missing or unreadable (not every OS has /proc)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def first_line(text: str, limit: int = 80) -> str:
    """The first non-empty line, shortened: enough of a tool's unexpected output to recognise it."""
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return "(empty)"


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: VmHWM from /proc/self/status on Linux.

    Not getrusage's ru_maxrss: on Linux a child keeps the maxrss its parent had when it forked,
    so a 2 GiB parent's child reports at least 2 GiB (measured: ru_maxrss 2062 MiB, VmHWM 13 MiB
    in a `python -c` child); every benchmark that runs a row per child process would be off."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
