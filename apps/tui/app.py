"""HanlinApp: what the whole app shares (the chosen device, the loaded model, the history
store) and the keys that work on every screen.

Choices made here:
- Ctrl-C quits (Textual's default makes it copy): a terminal user expects it to, and quitting
  goes through `action_quit`, which stops a running answer and the server/fine-tune processes
  before Textual restores the terminal.
- A terminal under 80x24 gets a screen that says so, not a squashed layout; it goes away as
  soon as the terminal is large enough again.
- Everything slow (loading, generating, pulling, evaluating) runs in worker threads and hands
  its results to the UI thread, so keys are answered while tokens arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.screen import Screen
from textual.widgets import Static

MIN_WIDTH, MIN_HEIGHT = 80, 24
DARK, LIGHT = "textual-dark", "textual-light"


@dataclass
class Session:
    """What the user has chosen so far. The app owns the loaded LLM and closes it."""

    device: Any = None  # hanlin.devices.Device
    model: str | None = None  # catalogue name or path
    llm: Any = None  # hanlin.LLM, loaded by the model picker
    engine: str = "auto"
    load_options: dict[str, Any] = field(default_factory=dict)
    kb: str | None = None  # the knowledge base folder last used (Agents, Knowledge base)


class TooSmall(Screen):
    """Shown while the terminal is smaller than MIN_WIDTH x MIN_HEIGHT."""

    DEFAULT_CSS = """
    TooSmall { align: center middle; }
    TooSmall Static { width: auto; max-width: 100%; content-align: center middle; text-align: center; }
    """

    def compose(self) -> ComposeResult:
        yield Static(id="too-small")

    def on_mount(self) -> None:
        self.show(self.app.size.width, self.app.size.height)

    def show(self, width: int, height: int) -> None:
        self.query_one("#too-small", Static).update(
            f"The terminal is {width}x{height}.\nhanlin needs at least {MIN_WIDTH}x{MIN_HEIGHT}:\nmake the window larger (Ctrl-C quits)."
        )


class HanlinCommands(Provider):
    """The command palette (Ctrl-P): jump to a screen, new conversation, theme."""

    def _commands(self) -> list[tuple[str, str, Callable[[], Any]]]:
        app: HanlinApp = self.app  # type: ignore[assignment]
        cmds = [
            ("Go to devices", "pick another device", app.goto_devices),
            ("Toggle light/dark theme", "switch between the light and the dark theme", app.action_toggle_theme),
            ("Help", "the key bindings of every screen", app.action_help),
        ]
        if app.session.device is not None:
            cmds.append(("Go to models", "pick another model", app.goto_models))
        if app.session.llm is not None:
            cmds += [
                ("Go to tasks", "chat, fine-tune, evaluate, serve, agents or the knowledge base", app.goto_tasks),
                ("Chat", "chat with the loaded model", lambda: app.open_task("chat")),
                ("Fine-tune", "fine-tune the loaded model", lambda: app.open_task("finetune")),
                ("Evaluate", "evaluate the loaded model", lambda: app.open_task("evaluate")),
                ("Serve", "serve the model over an OpenAI-compatible API", lambda: app.open_task("serve")),
                ("Agents", "tool-using agents and the planner on the loaded model", lambda: app.open_task("agents")),
                ("Knowledge base", "ingest documents, search them, ask with citations", lambda: app.open_task("kb")),
            ]
        return cmds

    async def discover(self) -> Hits:
        for name, help_text, run in self._commands():
            yield Hit(1.0, name, run, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, run in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), run, help=help_text)


class HanlinApp(App):
    TITLE = "hanlin"
    CSS_PATH = "hanlin.tcss"
    COMMANDS = App.COMMANDS | {HanlinCommands}
    BINDINGS = [
        Binding("ctrl+c", "quit", "Quit", priority=True, show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("f1", "help", "Help"),
        Binding("ctrl+t", "toggle_theme", "Theme"),
    ]

    def __init__(self, *, report: Any = None, history: str | Path | None = None, model: str | None = None,
                 device: str | None = None, engine: str = "auto", load_options: dict[str, Any] | None = None,
                 workdir: str | Path | None = None, theme: str = DARK):  # fmt: skip
        """report: a DeviceReport to show instead of probing (tests use a recorded one);
        history: the SQLite file (default $HANLIN_HOME/history.sqlite); model/device: skip
        those pickers; workdir: where fine-tune runs, eval runs and exports go (default: .)."""
        super().__init__()
        self._report = report
        self.history_path = history
        self._history: Any = None
        self.session = Session(engine=engine, load_options=dict(load_options or {}))
        self.start_model = model
        self.start_device = device
        self.workdir = Path(workdir) if workdir is not None else Path.cwd()
        self.theme = theme
        self._cleanups: list[Callable[[], None]] = []
        self.knowledge_bases: dict[str, Any] = {}  # folder -> KnowledgeBase, opened once (kb.open_kb)

    # -- shared parts ------------------------------------------------------------------

    @property
    def report(self) -> Any:
        if self._report is None:
            from hanlin.devices import detect

            self._report = detect()
        return self._report

    @property
    def history(self) -> Any:
        """The HistoryStore, opened on first use (raises HistoryError with the reason)."""
        if self._history is None:
            from hanlin.history import HistoryStore

            self._history = HistoryStore(self.history_path)
        return self._history

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        """Run fn when the app quits (stop a server, a fine-tune, an answer)."""
        self._cleanups.append(fn)

    # -- navigation --------------------------------------------------------------------

    def on_mount(self) -> None:
        from .devices import DeviceScreen

        self.push_screen(DeviceScreen())
        if self.start_device is not None:
            from hanlin.devices import get_device

            self.session.device = get_device(self.start_device)
            self.goto_models()
        self._check_size(self.size.width, self.size.height)

    def goto_devices(self) -> None:
        from .devices import DeviceScreen

        self._back_to(DeviceScreen)

    def goto_models(self) -> None:
        from .models import ModelScreen

        if not self._back_to(ModelScreen):
            self.push_screen(ModelScreen(preselect=self.start_model))
            self.start_model = None

    def goto_tasks(self) -> None:
        from .tasks import TaskScreen

        if not self._back_to(TaskScreen):
            self.push_screen(TaskScreen())

    def open_task(self, name: str) -> None:
        from .tasks import TASKS

        self.goto_tasks()
        self.push_screen(TASKS[name].screen())

    def _back_to(self, kind: type) -> bool:
        """Pop screens until one of `kind` is on top; False when there is none on the stack."""
        if not any(isinstance(s, kind) for s in self.screen_stack):
            return False
        while not isinstance(self.screen, kind):
            self.pop_screen()
        return True

    # -- size --------------------------------------------------------------------------

    def on_resize(self, event: events.Resize) -> None:
        self._check_size(event.size.width, event.size.height)

    def _check_size(self, width: int, height: int) -> None:
        small = width < MIN_WIDTH or height < MIN_HEIGHT
        if small and not isinstance(self.screen, TooSmall):
            self.push_screen(TooSmall())
        elif small:
            self.screen.show(width, height)  # type: ignore[attr-defined]
        elif isinstance(self.screen, TooSmall):
            self.pop_screen()

    # -- actions -----------------------------------------------------------------------

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    def action_help(self) -> None:
        from .help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit(0)

    def shutdown(self) -> None:
        """Stop whatever runs (answers, server, fine-tune) and close the model; idempotent."""
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - quitting must not fail on a cleanup
                pass
        llm, self.session.llm = self.session.llm, None
        if llm is not None:
            llm.close()

    def set_llm(self, llm: Any) -> None:
        old, self.session.llm = self.session.llm, llm
        if old is not None and old is not llm:
            old.close()
