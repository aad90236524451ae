"""Agents: ask a question, watch a tool-using agent (or the planner) work it out.

Everything is hanlin.agents: `make_agent(kind, llm, tools)` for ReAct, ReWOO and function
calling, `Planner(llm, kb)` for the MindSearch-style planner; their `.run(question)` yields
typed events, drawn here one by one as they arrive:

    thought      dim text
    tool_call    the tool's name and its JSON arguments
    tool_result  what came back (red when the call failed or was refused)
    notice       what the loop did on its own (a repeated call skipped, a step cut off)
    plan / node  the planner's sub-questions, in a table whose states change live
    answer       Markdown, with the sources it cites

The tools are the built-ins (calculator, python in the sandbox; no files, no network) and,
when the knowledge base folder holds a base, `search` over it. "Max steps" is the agents'
tool-call limit and the planner's number of sub-questions.

The run is a worker thread that posts each event to the screen (a message: the worker does not
wait for the UI). Esc sets a flag the worker
checks between events: the model finishes the step it is in (a step is one generation, a few
seconds), then the run ends, marked stopped.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Markdown, Select, Static

from .kb import WorkerCalls, open_kb, session_kb

KINDS = [
    ("ReAct", "react"),
    ("ReWOO", "rewoo"),
    ("Function calling", "function"),
    ("Function calling, tool first", "function-required"),
    ("Planner (needs a KB)", "planner"),
]
TITLES = {value: title for title, value in KINDS}
STATE_STYLE = {"waiting": "dim", "searching": "yellow", "answering": "yellow", "done": "green", "failed": "bold red"}
FORCED = {"max_steps": "the step limit was reached", "repeated_calls": "it repeated a call", "max_tokens": "a step was cut off"}
RESULT_CHARS = 1500  # of a tool result shown (the model reads all of it)
QUIT_WAIT_S = 20.0  # quitting waits this long for the step under way: the model is closed after


def answer_markdown(answer: Any) -> str:
    """An Answer event as Markdown: the text, then the sources it cites, numbered."""
    text = answer.text or "*(an empty answer)*"
    if answer.sources:
        text += "\n\n**Sources**\n\n" + "\n".join(f"{i}. {s.citation}" for i, s in enumerate(answer.sources, 1))
    return text


class AgentsScreen(WorkerCalls, Screen):
    BINDINGS = [
        Binding("ctrl+r", "run", "Run"),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+b", "back", "Tasks"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self._stop = threading.Event()
        self._idle = threading.Event()  # set by the worker thread itself when it has let go of the model
        self._idle.set()
        self.events: list[Any] = []  # every event of the last run, as drawn
        self._t0 = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="agent-form"):
            yield Input(id="question", placeholder="Question (Enter or Ctrl-R runs · Esc stops · Ctrl-B back)")
            with Horizontal(classes="labels"):
                yield Label("Agent", classes="kind")
                yield Label("Max steps", classes="number")
                yield Label("Max tokens", classes="number")
                yield Label("Knowledge base folder", classes="wide")
            with Horizontal(classes="row"):
                yield Select(KINDS, value="react", allow_blank=False, id="kind")
                yield Input("4", id="max-steps", type="integer", classes="number")
                yield Input("256", id="max-tokens", type="integer", classes="number")
                yield Input(session_kb(self.app), id="kb", placeholder="none: no search tool")
        yield Static(id="agent-status", classes="hint")
        yield Static(id="agent-error", classes="error")
        yield DataTable(id="nodes", cursor_type="none")
        yield VerticalScroll(id="transcript")
        yield Footer()

    def on_mount(self) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self.sub_title = "Agents" + (f" · {llm.name}" if llm is not None else "")
        table = self.query_one("#nodes", DataTable)
        table.add_column("node", key="id")
        table.add_column("state", key="state")
        table.add_column("question", key="question")
        table.add_column("answer", key="answer")
        table.display = False
        self.query_one("#agent-error").display = False
        self.query_one("#agent-status", Static).update("Tools: calculator, python and, with a knowledge base, search.")
        self.query_one("#question", Input).focus()
        self.app.on_cleanup(self._quit)  # type: ignore[attr-defined]

    def _quit(self) -> None:
        """The app quits: stop the run and let the step under way end before the model closes."""
        self._stop.set()
        self._idle.wait(QUIT_WAIT_S)

    # -- the form ----------------------------------------------------------------------

    def _number(self, field: str, label: str, high: int | None = None) -> int:
        text = self.query_one(f"#{field}", Input).value.strip()
        if not text.isdigit() or int(text) < 1 or (high is not None and int(text) > high):
            bound = f"from 1 to {high}" if high is not None else "at least 1"
            raise ValueError(f"{label} must be a whole number {bound}, not {text!r}")
        return int(text)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_run()

    def action_run(self) -> None:
        if self.running:
            self.app.notify("The agent is running: Esc stops it.", timeout=3)
            return
        err = self.query_one("#agent-error", Static)
        err.display = True
        question = self.query_one("#question", Input).value.strip()
        kind = self.query_one("#kind", Select).value
        folder = self.query_one("#kb", Input).value.strip()
        try:
            if not question:
                raise ValueError("Type a question first.")
            planner = kind == "planner"
            steps = self._number("max-steps", "Max steps" + (" (the planner's sub-questions)" if planner else ""), 9 if planner else None)
            tokens = self._number("max-tokens", "Max tokens")
            if planner and not folder:
                raise ValueError("The planner searches a knowledge base: give its folder (the Knowledge base task builds one).")
        except ValueError as e:
            err.update(str(e))
            return
        err.update("")
        err.display = False
        if folder:
            self.app.session.kb = folder  # type: ignore[attr-defined]
        self.events = []
        self.query_one("#transcript", VerticalScroll).remove_children()
        table = self.query_one("#nodes", DataTable)
        table.clear()
        table.display = False
        self.running = True
        self._stop.clear()
        self._idle.clear()
        self._t0 = time.perf_counter()
        self.query_one("#agent-status", Static).update(f"{TITLES[kind]} is working … (Esc stops after the current step)")  # type: ignore[index]
        self._run(kind, question, steps, tokens, folder)  # type: ignore[arg-type]

    def action_stop(self) -> None:
        if self.running and not self._stop.is_set():
            self._stop.set()
            self.query_one("#agent-status", Static).update("stopping after the current step …")

    def action_back(self) -> None:
        self._stop.set()
        self.app.pop_screen()

    # -- the run -----------------------------------------------------------------------

    def _runner(self, kind: str, steps: int, tokens: int, folder: str) -> Any:
        """The agent or planner to run (raises with a reason the user reads)."""
        from hanlin.agents import Notice, Planner, ToolsConfig, builtin_tools, make_agent, search_tool

        llm = self.app.session.llm  # type: ignore[attr-defined]
        if llm is None:
            raise ValueError("no model is loaded: pick one first (Ctrl-P, Go to models)")
        kb = None
        if folder:
            try:
                kb = open_kb(self.app, folder)
            except ImportError as e:
                if kind == "planner":
                    raise ValueError(f"the planner's knowledge base needs the rag extra ({e.name} is missing)") from None
                self._post(self.show, Notice(f"no search tool: the knowledge base needs the rag extra ({e.name} is missing)"))
            if kb is not None and kb.current() is None:
                if kind == "planner":
                    raise ValueError(f"the knowledge base at {kb.path} is empty: ingest a folder first (the Knowledge base task)")
                self._post(self.show, Notice(f"no search tool: the knowledge base at {kb.path} is empty"))
                kb = None
        if kind == "planner":
            return Planner(llm, kb, max_nodes=steps, max_tokens=tokens)
        tools = builtin_tools(ToolsConfig(workspace=None, allowed_hosts=(), python=True))
        if kb is not None:
            tools.add(search_tool(kb))
        if kind == "function-required":
            return make_agent("function", llm, tools, max_steps=steps, max_tokens=tokens, tool_choice="required")
        return make_agent(kind, llm, tools, max_steps=steps, max_tokens=tokens)

    @work(thread=True, exclusive=True, group="agent")
    def _run(self, kind: str, question: str, steps: int, tokens: int, folder: str) -> None:
        error = None
        events = None
        try:
            events = self._runner(kind, steps, tokens, folder).run(question)
            for event in events:
                self._post(self.show, event)
                if self._stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - shown on the screen, the app goes on
            error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        finally:
            if events is not None:
                events.close()  # a planner waits here for the nodes still running
            self._idle.set()
        self._post(self._finished, error, self._stop.is_set())

    def _finished(self, error: str | None, stopped: bool) -> None:
        self.running = False
        seconds = time.perf_counter() - self._t0
        calls = sum(e.kind == "tool_call" for e in self.events)
        answered = any(e.kind == "answer" for e in self.events)
        if error:
            self.query_one("#agent-error", Static).update(f"The run failed: {error}")
            self.query_one("#agent-error").display = True
            status = f"failed after {seconds:.1f} s"
        elif stopped and not answered:
            self._line("stopped (Esc): the run ended before an answer", "event stopped")
            status = f"stopped after {seconds:.1f} s · {calls} tool calls"
        else:
            status = f"done in {seconds:.1f} s · {calls} tool calls"
        self.query_one("#agent-status", Static).update(status)

    # -- drawing events ----------------------------------------------------------------

    def _line(self, text: str | Text, classes: str) -> Static:
        widget = Static(text, classes=classes, markup=False)
        self._mount(widget)
        return widget

    def _mount(self, widget: Any) -> None:
        log = self.query_one("#transcript", VerticalScroll)
        log.mount(widget)
        log.scroll_end(animate=False)

    def show(self, event: Any) -> None:
        """Draw one event (on the UI thread)."""
        self.events.append(event)
        kind = event.kind
        if kind == "thought":
            self._line(f"thought: {event.text}", "event thought")
        elif kind == "tool_call":
            self._line(f"→ {event.name} {json.dumps(event.arguments, ensure_ascii=False)}", "event tool_call")
        elif kind == "tool_result":
            content = event.content if len(event.content) <= RESULT_CHARS else event.content[:RESULT_CHARS] + " …"
            self._line(f"← {event.name}: {content}", "event tool_result" + ("" if event.ok else " failed"))
        elif kind == "notice":
            self._line(f"notice: {event.text}", "event notice")
        elif kind == "plan":
            table = self.query_one("#nodes", DataTable)
            table.clear()
            for n in event.nodes:
                after = f" (after {', '.join(n['depends_on'])})" if n.get("depends_on") else ""
                table.add_row(n["id"], Text("waiting", style=STATE_STYLE["waiting"]), n["question"] + after, "", key=n["id"])
            table.display = True
            self._line(f"plan: {len(event.nodes)} sub-questions", "event notice")
        elif kind == "node":
            self._node(event)
        elif kind == "answer":
            self._answer(event)

    def _node(self, event: Any) -> None:
        table = self.query_one("#nodes", DataTable)
        if event.id not in table.rows:
            return
        table.update_cell(event.id, "state", Text(event.state, style=STATE_STYLE.get(event.state, "")))
        if event.state in ("done", "failed"):
            text = " ".join((event.answer or event.error).split())
            table.update_cell(event.id, "answer", text[:80] + ("…" if len(text) > 80 else ""), update_width=True)
            self._line(f"{event.id} {event.state}: {event.answer or event.error}", "event node" + (" failed" if event.state == "failed" else ""))

    def _answer(self, event: Any) -> None:
        box = Vertical(classes="event answer")
        self._mount(box)
        box.mount(Label("Answer", classes="who"))
        box.mount(Markdown(answer_markdown(event)))
        if event.stopped:
            box.mount(Label(f"(answered early: {FORCED.get(event.stopped, event.stopped)})", classes="hint"))
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
