"""The model picker: the catalogue, what is here, what fits the chosen device; pull and load.

Loading happens here, not in the task screens, so a model that fails to load is reported on
this screen (the error stays in view) and the user picks again; a loaded model is what every
task uses.

"Fits" is an estimate: the file's size plus 20% and 0.3 GiB for the runtime and a default
context's KV cache, against the device's free memory (its total when free is unknown). There
is no inference memory planner yet; the fine-tune screen uses the real planner.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, ProgressBar, Static

OVERHEAD, RUNTIME = 1.2, 0.3 * 2**30


def fits(dev: Any, size_bytes: int) -> str:
    need = size_bytes * OVERHEAD + RUNTIME
    have = dev.memory_free if dev.memory_free is not None else dev.memory_total
    if have is None:
        return "unknown"
    return "yes" if need <= have else f"no: needs {need / 2**30:.1f} GiB"


class _ProgressWriter:
    """The text stream catalog.pull() writes its progress lines to, turned into bar updates."""

    def __init__(self, screen: "ModelScreen"):
        self.screen = screen
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = re.split(r"[\r\n]", self.buf)
        for line in lines:
            if line.strip():
                pct = re.search(r"(\d+)%\s*$", line)
                self.screen.app.call_from_thread(self.screen.pull_progress, line.strip(), int(pct.group(1)) if pct else None)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class ModelScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Devices"), Binding("ctrl+l", "path", "Local file")]

    def __init__(self, preselect: str | None = None):
        super().__init__()
        self.preselect = preselect
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="where", classes="where")
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        yield Input(placeholder="or a local .gguf file / model folder, then Enter (Ctrl-L)", id="path")
        yield Static(id="status", classes="detail")
        yield ProgressBar(total=100, show_eta=False, id="pull")
        yield Static(id="error", classes="error")
        yield Footer()

    def on_mount(self) -> None:
        from hanlin.catalog import DEFAULT_MODEL, list_models

        self.sub_title = "Model"
        dev = self.app.session.device  # type: ignore[attr-defined]
        self.query_one("#where", Static).update(f"Pick a model for {dev.label()} (↑/↓, Enter)")
        self.query_one("#pull", ProgressBar).display = False
        table = self.query_one(DataTable)
        table.add_columns("model", "params", "size", "here", "fits")
        for s in list_models():
            size = s.path.stat().st_size if s.path else s.entry.size_mb * 2**20
            name = s.entry.name + (" *" if s.entry.name == DEFAULT_MODEL else "")
            table.add_row(name, s.entry.params, f"{size / 2**20:.0f} MB", s.where or "pull", fits(dev, size), key=s.entry.name)
        table.focus()
        if self.preselect:
            self.choose(self.preselect)

    def action_back(self) -> None:
        if not self.busy:
            self.app.pop_screen()

    def action_path(self) -> None:
        self.query_one("#path", Input).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.choose(str(event.row_key.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.choose(event.value.strip())

    # -- pull and load -----------------------------------------------------------------

    def choose(self, model: str) -> None:
        if self.busy:
            return
        self.busy = True
        self.query_one("#error", Static).update("")
        self.status(f"loading {model} …")
        self.query_one(DataTable).disabled = True
        self._load(model)

    def status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def pull_progress(self, line: str, pct: int | None) -> None:
        bar = self.query_one("#pull", ProgressBar)
        bar.display = True
        self.status(line)
        if pct is not None:
            bar.update(progress=pct)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, model: str) -> None:
        import hanlin
        from hanlin import catalog

        session = self.app.session  # type: ignore[attr-defined]
        try:
            entry = catalog.find_entry(model) if not os.path.exists(os.path.expanduser(model)) else None
            if entry is not None and catalog.local_path(entry) is None:
                catalog.pull(entry.name, out=_ProgressWriter(self))  # type: ignore[arg-type]
            self.app.call_from_thread(self.status, f"loading {model} on {session.device.spec()} …")
            llm = hanlin.load(model, device=session.device, engine=session.engine, **session.load_options)
        except Exception as e:  # noqa: BLE001 - every failure is shown; the user picks again
            self.app.call_from_thread(self._failed, model, e)
            return
        self.app.call_from_thread(self._loaded, model, llm)

    def _failed(self, model: str, error: Exception) -> None:
        self.busy = False
        self.query_one("#pull", ProgressBar).display = False
        self.status("")
        name = Path(model).name if os.sep in model else model
        self.query_one("#error", Static).update(f"Could not load {name}: {error}\nPick another model or fix the file.")
        table = self.query_one(DataTable)
        table.disabled = False
        table.focus()

    def _loaded(self, model: str, llm: Any) -> None:
        self.busy = False
        self.query_one("#pull", ProgressBar).display = False
        self.query_one(DataTable).disabled = False
        self.status(f"loaded {llm.name}: {llm.engine.name} on {llm.device.spec()}, context {llm.context_length}")
        app = self.app
        app.set_llm(llm)  # type: ignore[attr-defined]
        app.session.model = model  # type: ignore[attr-defined]
        app.goto_tasks()  # type: ignore[attr-defined]
