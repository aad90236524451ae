"""The built-in tools, made from one config: what `hanlin agent` and the server will build
from their flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .calculator import calculator
from .fetch import http_fetch_tool
from .files import READ_LIMIT, read_file_tool
from .interpreter import python_tool
from .tools import Toolbox

if TYPE_CHECKING:
    from hanlin.evaluate.sandbox import Limits


@dataclass(frozen=True)
class ToolsConfig:
    """Which built-in tools an agent gets, and their limits.

    read_file is there only with a workspace; http_fetch only when hosts are allowed;
    python always (with the workspace's files copied into each run when there is one)."""

    workspace: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    python_limits: Limits | None = None  # None: python_tool's defaults
    read_limit: int = READ_LIMIT  # bytes read_file returns at most
    fetch_max_bytes: int = 512 * 1024
    fetch_timeout: float = 10.0
    python: bool = True  # False: no code execution at all


def builtin_tools(config: ToolsConfig = ToolsConfig()) -> Toolbox:
    """A Toolbox of the built-in tools that `config` allows."""
    box = Toolbox([calculator])
    if config.python:
        box.add(python_tool(config.workspace, limits=config.python_limits))
    if config.workspace is not None:
        box.add(read_file_tool(config.workspace, max_bytes=config.read_limit))
    if config.allowed_hosts:
        box.add(http_fetch_tool(config.allowed_hosts, max_bytes=config.fetch_max_bytes, timeout=config.fetch_timeout))
    return box
