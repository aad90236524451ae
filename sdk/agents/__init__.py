"""hanlin.agents: tools an agent calls, and the sandbox its code runs in.

    from hanlin.agents import Toolbox, ToolsConfig, builtin_tools, tool

    box = builtin_tools(ToolsConfig(workspace="notes/"))   # calculator, python, read_file
    box.run("calculator", {"expression": "2 ** 10"})       # ToolResult(name, ok, content)

tools.py       Tool, @tool, Toolbox: a typed function with a docstring is a tool
calculator.py  arithmetic by walking the syntax tree (no eval)
interpreter.py the python tool, over hanlin.evaluate.sandbox
files.py       read_file, confined to a workspace directory
fetch.py       http_fetch, off unless the user allows hosts
builtin.py     ToolsConfig and builtin_tools(): the built-ins from one config

Everything here is the standard library; the sandbox module is imported when a python
tool is made.
"""

from __future__ import annotations

from .builtin import ToolsConfig, builtin_tools
from .calculator import CalculatorError, calculator
from .fetch import FetchPolicy, http_fetch_tool
from .files import read_file_tool
from .interpreter import python_tool
from .tools import Tool, ToolError, ToolResult, Toolbox, function_schema, tool

__all__ = [
    "Tool", "ToolError", "ToolResult", "Toolbox", "tool", "function_schema",
    "calculator", "CalculatorError", "python_tool", "read_file_tool", "http_fetch_tool", "FetchPolicy",
    "ToolsConfig", "builtin_tools",
]  # fmt: skip
