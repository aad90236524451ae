"""hanlin.agents: tool-using agents, the tools they call, the sandbox their code runs in, and
a MindSearch-style planner.

    from hanlin.agents import ReActAgent, Planner, ToolsConfig, builtin_tools, search_tool

    box = builtin_tools(ToolsConfig(workspace="notes/"))   # calculator, python, read_file
    box.run("calculator", {"expression": "2 ** 10"})       # ToolResult(name, ok, content)
    for event in ReActAgent(llm, box).run("What is 2 ** 10?"):
        print(event.to_json())                             # thought, tool_call, tool_result, answer
    Planner(llm, kb).run("How do X and Y differ?")         # plan, node ..., answer with sources

agent.py       ReActAgent, ReWOOAgent, FunctionCallingAgent, make_agent
planner.py     Planner: a JSON graph of sub-questions, run in parallel, answer with citations
events.py      the typed events every agent streams
calls.py       tool calls in the model's own format under constrained decoding (shared with the server)
search.py      search over a knowledge base, as a tool and as the planner's searcher

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

from .agent import AGENTS, Agent, FunctionCallingAgent, ReActAgent, ReWOOAgent, make_agent
from .builtin import ToolsConfig, builtin_tools
from .events import Answer, Event, NodeUpdate, Notice, PlanGraph, Source, Thought, ToolCall, ToolOutput, event_from_dict
from .calculator import CalculatorError, calculator
from .fetch import FetchPolicy, http_fetch_tool
from .files import read_file_tool
from .interpreter import python_tool
from .planner import Planner
from .search import kb_searcher, search_tool
from .tools import Tool, ToolError, ToolResult, Toolbox, function_schema, tool

__all__ = [
    "Tool", "ToolError", "ToolResult", "Toolbox", "tool", "function_schema",
    "calculator", "CalculatorError", "python_tool", "read_file_tool", "http_fetch_tool", "FetchPolicy",
    "ToolsConfig", "builtin_tools",
    "Agent", "ReActAgent", "ReWOOAgent", "FunctionCallingAgent", "make_agent", "AGENTS", "Planner", "search_tool", "kb_searcher",
    "Event", "Thought", "ToolCall", "ToolOutput", "Notice", "PlanGraph", "NodeUpdate", "Answer", "Source", "event_from_dict",
]  # fmt: skip
