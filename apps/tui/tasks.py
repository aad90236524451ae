"""The task picker: what to do with the loaded model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList, Static
from textual.widgets.option_list import Option


def _missing(*modules: str, extra: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(gone)} (pip install -c constraints.txt -e '.[{extra}]')" if gone else None


@dataclass(frozen=True)
class Task:
    title: str
    description: str
    screen: Callable[[], Screen]
    unavailable: Callable[[], str | None] = lambda: None


def _chat() -> Screen:
    from .chat import ChatScreen

    return ChatScreen()


def _finetune() -> Screen:
    from .finetune import FinetuneScreen

    return FinetuneScreen()


def _evaluate() -> Screen:
    from .evaluate import EvaluateScreen

    return EvaluateScreen()


def _serve() -> Screen:
    from .serve import ServeScreen

    return ServeScreen()


def _agents() -> Screen:
    from .agents import AgentsScreen

    return AgentsScreen()


def _kb() -> Screen:
    from .kb import KnowledgeBaseScreen

    return KnowledgeBaseScreen()


TASKS: dict[str, Task] = {
    "chat": Task("Chat", "talk to the model; conversations are kept", _chat),
    "finetune": Task("Fine-tune", "LoRA, QLoRA, full or DPO on your JSONL data, with a memory plan first", _finetune,
                     lambda: _missing("torch", "peft", extra="torch,train")),  # fmt: skip
    "evaluate": Task("Evaluate", "GSM8K, CMMLU, HumanEval, WikiText-2, needle in a haystack", _evaluate),
    "serve": Task("Serve", "an OpenAI-compatible HTTP API on this machine", _serve, lambda: _missing("fastapi", "uvicorn", extra="serve")),
    "agents": Task("Agents", "tool-using agents (ReAct, ReWOO, functions) and a planner", _agents),
    "kb": Task("Knowledge base", "ingest documents, search them, answers with citations", _kb,
               lambda: _missing("faiss", "bm25s", "transformers", "torch", extra="rag,torch")),
}


class TaskScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Models")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="where", classes="where")
        yield OptionList(*self._options(), id="tasks")
        yield Static("Enter opens a task · Esc goes back to the models", classes="hint")
        yield Footer()

    def _options(self) -> list[Option]:
        out = []
        width = max(len(t.title) for t in TASKS.values())
        for key, t in TASKS.items():
            why = t.unavailable()
            text = f"{t.title:<{width}} {t.description}" + (f"\n{'':<{width}} unavailable: {escape(why)}" if why else "")
            out.append(Option(text, id=key, disabled=why is not None))
        return out

    def on_mount(self) -> None:
        s = self.app.session  # type: ignore[attr-defined]
        llm = s.llm
        what = f"{llm.name} · {llm.engine.name} on {llm.device.spec()}" if llm is not None else "no model loaded"
        self.query_one("#where", Static).update(f"Task for {what}")
        self.sub_title = "Task"
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.app.push_screen(TASKS[event.option.id].screen())  # type: ignore[index]

    def action_back(self) -> None:
        self.app.pop_screen()
