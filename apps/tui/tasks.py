"""The task picker: what to do with the loaded model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList, Static
from textual.widgets.option_list import Option


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(gone)} (pip install -c constraints.txt 'hanlin[...]')" if gone else None


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


TASKS: dict[str, Task] = {
    "chat": Task("Chat", "talk to the model; conversations are kept", _chat),
    "finetune": Task("Fine-tune", "LoRA, QLoRA, full or DPO on your JSONL data, with a memory plan first", _finetune,
                     lambda: _missing("torch", "peft")),  # fmt: skip
    "evaluate": Task("Evaluate", "GSM8K, CMMLU, HumanEval, WikiText-2, needle in a haystack", _evaluate),
    "serve": Task("Serve", "an OpenAI-compatible HTTP API on this machine", _serve, lambda: _missing("fastapi", "uvicorn")),
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
        for key, t in TASKS.items():
            why = t.unavailable()
            text = f"{t.title:<10} {t.description}" + (f"\n           unavailable: {why}" if why else "")
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
