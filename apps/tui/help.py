"""The help screen (F1): every screen's keys, read from the screens' own BINDINGS so the list
cannot drift from what the keys do."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


NAMES = {"escape": "Esc", "enter": "Enter", "delete": "Del", "space": "Space", "tab": "Tab"}


def key_name(key: str) -> str:
    """Textual's "ctrl+e" / "f2" / "escape" as people write them: Ctrl-E, F2, Esc."""
    *mods, last = key.split("+")
    last = NAMES.get(last, last.upper() if len(last) == 1 or last[0] == "f" else last)
    return "".join(f"{m.capitalize()}-" for m in mods) + last


def _keys(bindings) -> list[tuple[str, str]]:
    out = []
    for b in bindings:
        b = b if isinstance(b, Binding) else Binding(*b)
        if b.description and b.show:
            out.append((key_name(b.key), b.description))
    return out


def help_text() -> str:
    from .agents import AgentsScreen
    from .app import HanlinApp
    from .chat import ChatScreen
    from .devices import DeviceScreen
    from .evaluate import EvaluateScreen
    from .finetune import FinetuneScreen
    from .kb import KnowledgeBaseScreen
    from .models import ModelScreen
    from .serve import ServeScreen
    from .tasks import TaskScreen

    sections = [
        ("Everywhere", [("Ctrl-C", "Quit (also Ctrl-Q)"), ("Ctrl-P", "Command palette")] + _keys(HanlinApp.BINDINGS)),
        ("Devices", [("↑/↓ Enter", "Pick a device")] + _keys(DeviceScreen.BINDINGS)),
        ("Models", [("↑/↓ Enter", "Pick (pull if needed) and load")] + _keys(ModelScreen.BINDINGS)),
        ("Tasks", [("↑/↓ Enter", "Open a task")] + _keys(TaskScreen.BINDINGS)),
        ("Chat", [("Enter", "Send the message")] + _keys(ChatScreen.BINDINGS)),
        ("Fine-tune", _keys(FinetuneScreen.BINDINGS)),
        ("Evaluate", _keys(EvaluateScreen.BINDINGS)),
        ("Serve", _keys(ServeScreen.BINDINGS)),
        ("Agents", [("Enter", "Run the question")] + _keys(AgentsScreen.BINDINGS)),
        ("Knowledge base", [("Enter", "Search; in the documents box: Ingest")] + _keys(KnowledgeBaseScreen.BINDINGS)),
    ]
    lines = []
    for title, keys in sections:
        lines.append(f"[b]{title}[/b]")
        seen = set()
        for key, what in keys:
            if key not in seen:
                seen.add(key)
                lines.append(f"  {key:<12} {what}")
    return "\n".join(lines)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape", "close", "Close"), Binding("f1", "close", "Close", show=False), Binding("q", "close", show=False)]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static("hanlin — keys  (Esc closes)", classes="where")
            yield Static(help_text(), id="help-text")

    def action_close(self) -> None:
        self.app.pop_screen()
