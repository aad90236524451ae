"""Knowledge base: ingest a folder, search it, ask it questions answered with citations.

Everything is hanlin.rag: `KnowledgeBase.ingest` (its log callback feeds the log pane line by
line), `.search` (the hits table), `.answerable` and `hanlin.rag.answer.answer` (Ask). Ask
declines a question whose relevance is under the knowledge base's calibrated threshold, with
the words `hanlin kb ask` uses, and never calls the model for it.

Choices made here:
- The folder defaults to $HANLIN_KB or ~/.cache/hanlin/kb/default, as the CLI's --kb does;
  the last folder used (here or on the Agents screen) is kept for the session.
- An opened KnowledgeBase is kept by the app (one per folder), so the embedding model is
  loaded once, not at every search; an existing base is opened with the embedding model it
  was built with (its manifest says which).
- Everything that touches the index runs in a worker thread: loading FAISS and the embedder
  takes seconds. Esc stops an ingest at its next file: nothing of it is written, and the
  previous generation stays live (the index switches generations atomically).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Log, Markdown, Static

QUIT_WAIT_S = 20.0
_OPEN_LOCK = threading.Lock()


def default_kb() -> str:
    """The knowledge base folder the CLI uses when --kb is not given."""
    return os.environ.get("HANLIN_KB", os.path.join("~", ".cache", "hanlin", "kb", "default"))


def session_kb(app: Any) -> str:
    """The folder last used in this session, else the default."""
    return getattr(app.session, "kb", None) or default_kb()


def open_kb(app: Any, folder: str) -> Any:
    """The app's KnowledgeBase for folder (made once per folder; any thread). An existing
    base is opened with the embedding model its manifest names. Raises ImportError without
    the rag extra, KBError for a damaged base."""
    from hanlin.rag import KnowledgeBase

    path = str(Path(folder).expanduser().resolve())
    with _OPEN_LOCK:
        kb = app.knowledge_bases.get(path)
        if kb is None:
            kb = KnowledgeBase(path)
            if kb.current() is not None:
                model = kb.manifest.get("embedding_model")
                if model and model != kb.embedding_model:
                    kb = KnowledgeBase(path, embedding_model=model)
            app.knowledge_bases[path] = kb
    return kb


def describe(kb: Any) -> str:
    """One line about a knowledge base: its generation, files, chunks, model and threshold."""
    gen = kb.current()
    if gen is None:
        return f"{kb.path}: empty — ingest a folder to build it"
    m = kb.manifest
    files = m.get("files", {})
    chunks = sum(f["end"] - f["start"] for f in files.values())
    t = m.get("threshold")
    rejection = f"declines under relevance {t:.3f}" if t is not None else "not calibrated: every question is answered"
    return f"{kb.path} · {gen.name} · {len(files)} files, {chunks} chunks · {m.get('embedding_model')} · {rejection}"


class ScreenCall(Message):
    """A call a worker thread hands to its screen. post_message is thread-safe and does not
    wait (call_from_thread does: a worker waiting for the UI thread while the UI thread, quitting,
    waits for the worker would hold both)."""

    bubble = False

    def __init__(self, fn: Any, args: tuple[Any, ...]):
        super().__init__()
        self.fn, self.args = fn, args


class WorkerCalls:
    """For a Screen whose worker threads update it: _post from the thread, run on the UI thread."""

    def _post(self, fn: Any, *args: Any) -> None:
        """From a worker thread: fn(*args) on the UI thread, in order, without waiting for it."""
        self.post_message(ScreenCall(fn, args))  # type: ignore[attr-defined]

    def on_screen_call(self, message: ScreenCall) -> None:
        if self.is_attached:  # type: ignore[attr-defined]  (a screen already closed ignores late calls)
            message.fn(*message.args)


class Stopped(Exception):
    """Raised from ingest's log callback to stop it (nothing of the new generation is kept)."""


class KnowledgeBaseScreen(WorkerCalls, Screen):
    BINDINGS = [
        Binding("ctrl+o", "ingest", "Ingest"),
        Binding("ctrl+f", "search", "Search"),
        Binding("ctrl+r", "ask", "Ask"),
        Binding("escape", "stop", "Stop ingest"),
        Binding("ctrl+b", "back", "Tasks"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.busy: str | None = None  # "ingest", "search", "ask" while one runs
        self._stop = threading.Event()
        self._idle = threading.Event()  # set by the worker thread itself when it has let go of the model
        self._idle.set()
        self.hits: list[Any] = []  # what the table shows
        self.answer_text: str | None = None
        self.report: Any = None  # the last IngestReport

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="labels"):
            yield Label("Knowledge base folder", classes="wide")
            yield Label("Folder of documents to ingest", classes="wide")
            yield Label("", classes="button-gap")
        with Horizontal(classes="row"):
            yield Input(session_kb(self.app), id="kb", placeholder="knowledge base folder")
            yield Input("", id="ingest-dir", placeholder="documents folder (Enter ingests)")
            yield Button("Ingest", id="ingest")
        with Horizontal(classes="row"):
            yield Input("", id="query", placeholder="Question (Enter searches · Ctrl-R asks the model)")
            yield Button("Search", id="search")
            yield Button("Ask", id="ask", variant="primary")
        yield Static(id="kb-status", classes="hint")
        yield Static(id="kb-error", classes="error")
        yield DataTable(id="hits", zebra_stripes=True, cursor_type="row")
        yield Log(id="kb-log", max_lines=2000)
        with VerticalScroll(id="kb-answer-box"):
            yield Markdown(id="kb-answer")
        yield Footer()

    def on_mount(self) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self.sub_title = "Knowledge base" + (f" · {llm.name}" if llm is not None else "")
        table = self.query_one("#hits", DataTable)
        for name in ("#", "source", "score", "similarity", "text"):
            table.add_column(name, key=name)
        self.query_one("#kb-answer-box").display = False
        self.query_one("#kb-error").display = False
        self.query_one("#query", Input).focus()
        self.app.on_cleanup(self._quit)  # type: ignore[attr-defined]
        self._status(self._folder())

    def _quit(self) -> None:
        """The app quits: stop an ingest; let an answer being written end before the model closes."""
        self._stop.set()
        self._idle.wait(QUIT_WAIT_S)

    # -- the form ----------------------------------------------------------------------

    def _folder(self) -> str:
        return self.query_one("#kb", Input).value.strip()

    def error(self, text: str) -> None:
        widget = self.query_one("#kb-error", Static)
        widget.update(text)
        widget.display = bool(text)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "kb":
            self._status(self._folder())
        elif event.input.id == "ingest-dir":
            self.action_ingest()
        elif event.input.id == "query":
            self.action_search()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"ingest": self.action_ingest, "search": self.action_search, "ask": self.action_ask}[event.button.id]()  # type: ignore[index]

    def _start(self, what: str) -> str | None:
        """The KB folder when `what` may start now; else None with the reason shown."""
        if self.busy:
            self.app.notify(f"{self.busy.capitalize()} is running: wait for it (Esc stops an ingest).", timeout=3)
            return None
        folder = self._folder()
        if not folder:
            self.error("Give the knowledge base folder (it is created by the first ingest).")
            return None
        self.error("")
        self.busy = what
        self._stop.clear()
        self._idle.clear()
        self.app.session.kb = folder  # type: ignore[attr-defined]
        return folder

    def _question(self) -> str | None:
        q = self.query_one("#query", Input).value.strip()
        if not q:
            self.error("Type a question in the query box first.")
            self.query_one("#query", Input).focus()
        return q or None

    # -- actions -----------------------------------------------------------------------

    def action_ingest(self) -> None:
        source = self.query_one("#ingest-dir", Input).value.strip()
        if not source:
            self.error("Give the folder of documents to ingest.")
            self.query_one("#ingest-dir", Input).focus()
            return
        if not os.path.isdir(os.path.expanduser(source)):
            self.error(f"{source} is not a folder: give the folder of documents to ingest.")
            return
        folder = self._start("ingest")
        if folder is None:
            return
        log = self.query_one("#kb-log", Log)
        log.clear()
        log.display = True
        self.query_one("#kb-answer-box").display = False
        log.write_line(f"ingesting {source} into {folder} …")
        self.query_one("#kb-status", Static).update("ingesting … (Esc stops)")
        self._ingest(folder, os.path.expanduser(source))

    def action_search(self) -> None:
        q = self._question()
        if q is None:
            return
        folder = self._start("search")
        if folder is not None:
            self.query_one("#kb-status", Static).update("searching …")
            self._search(folder, q, False)

    def action_ask(self) -> None:
        q = self._question()
        if q is None:
            return
        if self.app.session.llm is None:  # type: ignore[attr-defined]
            self.error("Load a model first (Ctrl-P, Go to models).")
            return
        folder = self._start("ask")
        if folder is not None:
            self.query_one("#kb-status", Static).update("searching, then the model answers …")
            self._search(folder, q, True)

    def action_stop(self) -> None:
        if self.busy == "ingest":
            self._stop.set()
            self.query_one("#kb-status", Static).update("stopping at the next file …")

    def action_back(self) -> None:
        self._stop.set()
        self.app.pop_screen()

    # -- workers -----------------------------------------------------------------------

    @work(thread=True, group="kb-status", exclusive=True)
    def _status(self, folder: str) -> None:
        if not folder:
            return
        try:
            line = describe(open_kb(self.app, folder))
        except ImportError as e:
            line, err = "", f"The knowledge base needs the rag extra ({e.name} is missing): pip install -c constraints.txt -e '.[rag]'"
            self._post(self.error, err)
        except Exception as e:  # noqa: BLE001 - a damaged base is reported, the screen stays
            line = ""
            self._post(self.error, str(e))
        self._post(self._set_status, line)

    def _set_status(self, line: str) -> None:
        self.query_one("#kb-status", Static).update(line)

    def _log_line(self, line: str) -> None:
        self.query_one("#kb-log", Log).write_line(line)

    @work(thread=True, group="kb", exclusive=True)
    def _ingest(self, folder: str, source: str) -> None:
        def log(line: str) -> None:
            if self._stop.is_set():
                raise Stopped()
            self._post(self._log_line, line)

        report, error = None, None
        try:
            kb = open_kb(self.app, folder)
            report = kb.ingest(source, log=log)
            status = describe(kb)
        except Stopped:
            error, status = "Ingest stopped: nothing of it was written; the knowledge base is as it was.", ""
        except Exception as e:  # noqa: BLE001 - shown on the screen
            error, status = f"Ingest failed: {e}", ""
        finally:
            self._idle.set()
        self._post(self._ingested, report, status, error)

    def _ingested(self, report: Any, status: str, error: str | None) -> None:
        self.busy = None
        log = self.query_one("#kb-log", Log)
        if error:
            self.error(error)
            log.write_line(error)
        else:
            self.report = report
            for line in report.summary().splitlines():
                log.write_line(line)
        self.query_one("#kb-status", Static).update(status)

    @work(thread=True, group="kb", exclusive=True)
    def _search(self, folder: str, question: str, ask: bool) -> None:
        t0 = time.perf_counter()
        try:
            kb = open_kb(self.app, folder)
            if kb.current() is None:
                raise ValueError(f"{kb.path} holds no knowledge base yet: ingest a folder first")
            hits = kb.search(question, k=5)
            ok, relevance = kb.answerable(question, hits)
            text, used = None, hits
            if ask:
                if ok:
                    from hanlin.rag.answer import answer

                    text, used = answer(self.app.session.llm, question, hits)  # type: ignore[attr-defined]
                else:
                    from hanlin.rag.answer import DECLINED

                    text, used = DECLINED, []
        except Exception as e:  # noqa: BLE001 - shown on the screen
            self._post(self._searched, [], None, True, 0.0, f"{'Ask' if ask else 'Search'} failed: {e}", 0.0)
            return
        finally:
            self._idle.set()
        self._post(self._searched, used, text, ok, relevance, None, time.perf_counter() - t0)

    def _searched(self, hits: list[Any], text: str | None, ok: bool, relevance: float, error: str | None, seconds: float) -> None:
        self.busy = None
        if error:
            self.error(error)
            self.query_one("#kb-status", Static).update("")
            return
        self.hits = hits
        table = self.query_one("#hits", DataTable)
        table.clear()
        for i, h in enumerate(hits, 1):
            snippet = " ".join(h.text.split())
            table.add_row(str(i), h.citation(), f"{h.score:.4f}", f"{h.similarity:.3f}", snippet[:100] + ("…" if len(snippet) > 100 else ""))
        note = "" if ok else " · under the calibrated threshold: Ask declines this question"
        self.query_one("#kb-status", Static).update(f"{len(hits)} passages · relevance {relevance:.3f}{note} · {seconds:.1f} s")
        if text is None:
            self.query_one("#kb-answer-box").display = False
            return
        self.answer_text = text
        sources = "".join(f"\n{i}. {h.citation()}" for i, h in enumerate(hits, 1))
        body = text + (f"\n\n**Sources**\n{sources}" if sources else "")
        self.query_one("#kb-log").display = False
        self.query_one("#kb-answer-box").display = True
        self.query_one("#kb-answer", Markdown).update(body)
