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
