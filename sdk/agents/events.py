"""What an agent run streams: one typed event per thing that happened, in order.

Every agent (ReAct, ReWOO, function calling) and the planner yield these; the CLI prints
them, the server sends each as one server-sent event (`to_dict()` is its JSON), and the
terminal app draws them. `kind` names the type on the wire:

    thought      the model's reasoning before an action (ReAct, ReWOO's plan steps)
    tool_call    a call the model made: id, tool name, arguments (already parsed JSON)
    tool_result  what the tool gave back (ok False: refused or failed; the model reads it)
    notice       something the loop did on its own: a repeated call skipped, a step limit hit
    plan         the planner's graph of sub-questions (nodes with their dependencies)
    node         one planner node changed state: waiting, searching, answering, done, failed
    answer       the final answer; `stopped` says why it was forced early, `sources` what it cites
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True)
class Thought(Event):
    kind: ClassVar[str] = "thought"
    text: str


@dataclass(frozen=True)
class ToolCall(Event):
    kind: ClassVar[str] = "tool_call"
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolOutput(Event):
    kind: ClassVar[str] = "tool_result"
    id: str
    name: str
    ok: bool
    content: str


@dataclass(frozen=True)
class Notice(Event):
    kind: ClassVar[str] = "notice"
    text: str


@dataclass(frozen=True)
class Source:
    """A passage an answer rests on: where it is (file and location, or a URL) and its text."""

    citation: str
    text: str


@dataclass(frozen=True)
class PlanGraph(Event):
    kind: ClassVar[str] = "plan"
    nodes: tuple[dict[str, Any], ...]  # {"id", "question", "depends_on": [...]}, in a runnable order


@dataclass(frozen=True)
class NodeUpdate(Event):
    kind: ClassVar[str] = "node"
    id: str
    state: str  # waiting | searching | answering | done | failed
    question: str
    answer: str = ""
    sources: tuple[Source, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class Answer(Event):
    kind: ClassVar[str] = "answer"
    text: str
    stopped: str | None = None  # None, "max_steps" or "repeated_calls": why the answer was forced
    sources: tuple[Source, ...] = field(default=())


def event_from_dict(d: dict[str, Any]) -> Event:
    """The event a to_dict() came from (what a client of the server's stream rebuilds)."""
    kinds = {c.kind: c for c in (Thought, ToolCall, ToolOutput, Notice, PlanGraph, NodeUpdate, Answer)}
    d = dict(d)
    cls = kinds.get(d.pop("type", None))
    if cls is None:
        raise ValueError(f"not an agent event: {d!r}")
    if "sources" in d:
        d["sources"] = tuple(Source(**s) for s in d["sources"])
    if "nodes" in d:
        d["nodes"] = tuple(d["nodes"])
    return cls(**d)
