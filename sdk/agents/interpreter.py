"""The python tool: model-written code runs in hanlin.evaluate.sandbox, the same sandbox
that runs HumanEval completions (a fresh process per run with wall-clock, CPU, memory,
process-count and file-size limits, an empty environment, a throwaway directory, no network,
and, when the harness is root, the unprivileged `nobody` user).

Given a workspace, each run starts in a copy of it: the code can read the files the
agent's read_file sees, and what it writes is thrown away with the run, so the user's files
are never changed.
"""

from __future__ import annotations

import os
import re
import signal
from typing import TYPE_CHECKING

from .files import snapshot, workspace_root
from .tools import Tool, ToolError, tool

if TYPE_CHECKING:
    from hanlin.evaluate.sandbox import Limits, RunResult

TAIL_CHARS = 4000  # characters of stdout and of stderr the model sees (the end: tracebacks are there)
COPY_LIMIT_MB = 64  # most workspace data copied into one run
_SANDBOX_DIR = re.compile(r"/[^\s\"']*?hanlin-sandbox-[^/\s\"']+/")


def python_tool(workspace: str | os.PathLike[str] | None = None, *, limits: Limits | None = None,
                tail_chars: int = TAIL_CHARS, copy_limit_mb: int = COPY_LIMIT_MB) -> Tool:  # fmt: skip
    """The python tool. `limits` defaults to 10 s wall clock and CPU, 512 MB, 16 processes,
    16 MB per written file."""
    from hanlin.evaluate.sandbox import SCRIPT_NAME, Limits, run_python

    limits = limits or Limits(wall_seconds=10, cpu_seconds=10, memory_mb=512, processes=16, file_mb=16)
    root = workspace_root(workspace) if workspace is not None else None

    def python(code: str) -> str:
        """Run a Python program in a sandbox and return what it printed and how it ended.
        Print the values you want to see. Each run starts afresh, without network access.

        Args:
            code: the whole program, e.g. "import math\\nprint(math.factorial(20))".
        """
        files, notes = snapshot(root, copy_limit_mb << 20) if root is not None else ({}, [])
        if SCRIPT_NAME in files:
            del files[SCRIPT_NAME]
            notes.append(f"{SCRIPT_NAME} (the sandbox's own script has that name)")
        result = run_python(code, limits=limits, files=files)
        if result.status == "error":
            raise ToolError(f"the sandbox could not start: {result.stderr.strip()}")
        report = [f"exit: {exit_reason(result, limits)}"]
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text:
                report += [f"{name}:", _tail(_SANDBOX_DIR.sub("", text), tail_chars).rstrip("\n")]
        if not (result.stdout or result.stderr):
            report.append("(no output: print the values you want to see)")
        if notes:
            report.append("not copied from the workspace: " + "; ".join(notes))
        return "\n".join(report)

    made = tool(python)
    if root is not None:
        made = tool(python, description=made.description + " The workspace's files are in the current directory.")
    return made


def exit_reason(result: RunResult, limits: Limits) -> str:
    """How a run ended, in words the model can act on."""
    if result.status == "passed":
        return f"ok ({result.seconds:.2f} s)"
    if result.status == "failed":
        return f"failed with exit code {result.returncode}"
    if result.status == "timeout":
        if result.seconds >= limits.wall_seconds:
            return f"timeout: stopped after the {limits.wall_seconds:g} s wall-clock limit"
        return f"timeout: stopped at the {limits.cpu_seconds} s CPU-time limit"
    if result.status == "memory":
        return f"out of memory: the limit is {limits.memory_mb} MB"
    if result.status == "killed" and result.returncode is not None and result.returncode < 0:
        try:
            name = signal.Signals(-result.returncode).name
        except ValueError:
            name = f"signal {-result.returncode}"
        return f"killed by {name}"
    return f"{result.status} (exit code {result.returncode})"


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit:,} earlier characters cut]\n" + text[-limit:]
