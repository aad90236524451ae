"""Evaluate: pick tasks and a limit, watch the answers come in, read the results table.

The harness (hanlin.evaluate) runs in a worker thread on the model already loaded; its
progress callback feeds the bar. Stopping raises out of that callback, so the harness stops at
its next batch; every answer so far is in the run's answer cache and a rerun resumes there.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, ProgressBar, SelectionList, Static


class Stopped(Exception):
    """Raised from the progress callback to stop the harness."""


class EvaluateScreen(Screen):
    BINDINGS = [Binding("ctrl+r", "run", "Run"), Binding("ctrl+s", "stop", "Stop"), Binding("escape", "back", "Tasks")]

    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self._stop = threading.Event()
        self.results: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        from hanlin.evaluate import builtin_tasks

        yield Header()
        with Horizontal(id="eval-form"):
            with Vertical(id="eval-tasks"):
                yield Label("Tasks (Space toggles)")
                yield SelectionList[str](*[(t, t, t == "cmmlu") for t in builtin_tasks()], id="tasks")
            with Vertical(id="eval-options"):
                yield Label("Limit (questions per task, per subject for CMMLU; empty = all)")
                yield Input("10", id="limit")
                yield Label("Few-shot examples (empty = the task's default)")
                yield Input("", id="shots")
                yield Static("Ctrl-R runs · Ctrl-S stops · Esc back", classes="hint")
        yield Static(id="eval-status", classes="detail")
        yield ProgressBar(total=1, show_eta=False, id="eval-progress")
        yield Static(id="eval-error", classes="error")
        yield DataTable(id="results", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self.sub_title = f"Evaluate · {llm.name}"
        self.query_one("#results", DataTable).add_columns("task", "metric", "score", "n", "time (s)")
        self.query_one("#tasks", SelectionList).focus()
        self.app.on_cleanup(self._stop.set)  # type: ignore[attr-defined]

    def _int(self, field: str) -> int | None:
        text = self.query_one(f"#{field}", Input).value.strip()
        if not text:
            return None
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{field} must be a whole number of at least 1 (or empty), not {text!r}")
        return int(text)

    def action_run(self) -> None:
        if self.running:
            return
        err = self.query_one("#eval-error", Static)
        tasks = list(self.query_one("#tasks", SelectionList).selected)
        try:
            if not tasks:
                raise ValueError("choose at least one task (Space toggles a task)")
            limit, shots = self._int("limit"), self._int("shots")
        except ValueError as e:
            err.update(str(e))
            return
        err.update("")
        self.running = True
        self._stop.clear()
        self.query_one("#results", DataTable).clear()
        self._run(tasks, limit, shots)

    def action_stop(self) -> None:
        if self.running:
            self._stop.set()
            self.query_one("#eval-status", Static).update("stopping at the next batch …")

    def action_back(self) -> None:
        self._stop.set()
        self.app.pop_screen()

    def progress(self, task: str, done: int, total: int) -> None:
        bar = self.query_one("#eval-progress", ProgressBar)
        bar.update(total=max(total, 1), progress=done)
        self.query_one("#eval-status", Static).update(f"{task}: {done}/{total} answers")

    @work(thread=True, exclusive=True, group="eval")
    def _run(self, tasks: list[str], limit: int | None, shots: int | None) -> None:
        from hanlin import evaluate as ev

        app = self.app
        llm = app.session.llm  # type: ignore[attr-defined]
        last = [0.0]

        def progress(task: str, done: int, total: int) -> None:
            if self._stop.is_set():
                raise Stopped()
            now = time.monotonic()
            if done == total or now - last[0] > 0.1:
                last[0] = now
                app.call_from_thread(self.progress, task, done, total)

        out = app.workdir / "eval-runs" / (re.sub(r"[^A-Za-z0-9._-]+", "_", llm.name) + f"-{llm.engine.name}")  # type: ignore[attr-defined]
        try:
            model = ev.open_model(llm)
            results = ev.evaluate(model, tasks, out_dir=str(out), limit=limit, shots=shots, progress=progress)
        except Stopped:
            app.call_from_thread(self._done, None, "stopped; the answers so far are cached, Ctrl-R resumes")
            return
        except Exception as e:  # noqa: BLE001 - shown on the screen
            app.call_from_thread(self._done, None, f"evaluation failed: {e}")
            return
        app.call_from_thread(self._done, results, None)

    def _done(self, results: dict[str, Any] | None, error: str | None) -> None:
        from hanlin.evaluate.report import rows_of

        self.running = False
        if error:
            self.query_one("#eval-error", Static).update(error)
            self.query_one("#eval-status", Static).update("")
            return
        self.results = results
        table = self.query_one("#results", DataTable)
        for task, metric, score, n, secs in rows_of(results):
            table.add_row(task, metric, f"{score:.2f}", str(n), f"{secs:.1f}")
        self.query_one("#eval-status", Static).update(f"done in {results['seconds']:.1f} s · report: {results['files']['markdown']}")
