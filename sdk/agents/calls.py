"""Tool calls in the model's own format, under constrained decoding: shared by the agents and
the server's /v1/chat/completions.

The format is Hermes's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which
Qwen2.5, Hermes, SmolLM3 and most open chat models are trained on. When the model's chat
template reads `tools` (Qwen2.5, Llama 3.1, InternLM2.5 ...) the tool list and the turns go
through the template; otherwise a system message lists the tools and the turns are written in
that format by hand (`template_messages`).

A call's JSON is produced under a JSON schema (`call_schema`): the name is one of the tools
and the arguments follow that tool's parameter schema, so the call parses whatever the
model's size. What the call says is the model's business; that it parses is ours.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

TRIGGER = "<tool_call>"
CLOSE = "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def spec_of(tool: Any) -> dict[str, Any]:
    """{"name", "description", "parameters"} of a Tool, an OpenAI `tools` entry or such a dict."""
    if hasattr(tool, "parameters") and hasattr(tool, "name"):
        return {"name": tool.name, "description": getattr(tool, "description", "") or "", "parameters": tool.parameters}
    if isinstance(tool, dict) and "function" in tool:
        tool = tool["function"]
    return {"name": tool["name"], "description": tool.get("description") or "", "parameters": tool.get("parameters") or {"type": "object"}}


def call_object_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """One call of this tool as a JSON object: {"name": <the name>, "arguments": {...}}."""
    return {"type": "object", "properties": {"name": {"const": spec["name"]}, "arguments": spec["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip


def call_schema(tools: Iterable[Any], only: str | None = None) -> dict[str, Any]:
    """A call of any of these tools (or of the one named `only`)."""
    options = [call_object_schema(s) for s in map(spec_of, tools) if only is None or s["name"] == only]
    if not options:
        raise ValueError(f"no tool named {only!r}")
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_note(tools: Iterable[Any]) -> str:
    """The system text that shows the tools to a model whose template does not read them."""
    spec = "\n".join(json.dumps(spec_of(t), ensure_ascii=False) for t in tools)
    return ("You can call these functions:\n" + spec + f"\nTo call one, answer with {TRIGGER}{{\"name\": <function name>, "
            f"\"arguments\": <arguments object>}}{CLOSE}.")  # fmt: skip


def hermes_call(name: str, arguments: Any) -> str:
    return f"{TRIGGER}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{CLOSE}"


def template_messages(messages: Sequence[dict[str, Any]], tools: Sequence[Any], reads_tools: bool) -> list[dict[str, Any]]:
    """Chat messages (OpenAI shape: roles system/developer/user/assistant/tool, assistant
    `tool_calls`, tool `tool_call_id`) as the model's template takes them: kept as they are when
    it reads tools; otherwise tool results become the user's turn in <tool_response> and the
    assistant's calls are written out as <tool_call> blocks, with the tools in a system note."""
    out = []
    for m in messages:
        content = m.get("content")
        msg: dict[str, Any] = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if reads_tools:
            for key in ("tool_calls", "tool_call_id", "name"):
                if m.get(key):
                    msg[key] = m[key]
        elif m["role"] == "tool":
            msg = {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
        elif m.get("tool_calls"):
            calls = "".join(hermes_call(c["function"]["name"], call_arguments(c)) for c in m["tool_calls"] if "function" in c)
            msg = {"role": "assistant", "content": (content or "") + calls}
        if msg["content"] is None and not msg.get("tool_calls"):
            msg["content"] = ""
        out.append(msg)
    if tools and not reads_tools:
        note = tools_note(tools)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{note}")
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def call_arguments(call: dict[str, Any]) -> Any:
    """The arguments of an OpenAI-shaped call, parsed when they are JSON text."""
    raw = call["function"].get("arguments", "{}")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw


def loads(text: str) -> Any:
    """JSON from constrained decoding. strict=False: llama.cpp's JSON grammar lets raw control
    characters (a newline) into strings, which strict JSON forbids; the text is otherwise JSON."""
    return json.loads(text, strict=False)


def parse_calls(text: str, names: Iterable[str], *, whole: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of each call in a model's answer: the whole text when it was produced
    under call_schema (whole=True), else every <tool_call> block that names a known tool with
    an arguments object. Anything else is not a call."""
    known = set(names)
    out = []
    for blob in [text] if whole else _CALL.findall(text):
        try:
            obj = loads(blob)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in known and isinstance(obj.get("arguments", {}), dict):
            out.append((obj["name"], obj.get("arguments", {})))
    return out
