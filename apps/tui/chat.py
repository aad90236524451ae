"""Chat: streamed Markdown answers, Esc to stop, conversations kept in SQLite.

How tokens reach the screen: the answer is generated in a worker thread, which only appends
text to a buffer under a lock; a 20 Hz timer on the UI thread moves whatever has arrived into
the answer's Markdown widget in one append. So the UI repaints at most 20 times a second
whatever the token rate, and the input box answers keys while the model runs.

History: the user's message is saved when it is sent, the answer when it ends (stopped answers
too, marked as such). A failed write (a locked database, a full disk) shows a message and the
conversation stays on screen; the store's transactions mean nothing saved before is lost.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Markdown, Static

FLUSH_HZ = 20


class Ask(ModalScreen[str | None]):
    """One line of input in a dialog (rename, export path, delete confirmation)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = ""):
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Input(self.value, id="answer")
            yield Label("Enter confirms · Esc cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Turn(Vertical):
    """One message: who said it, and the Markdown body."""

    def __init__(self, role: str, text: str = ""):
        super().__init__(classes=f"turn {role}")
        self.role, self.text = role, text

    def compose(self) -> ComposeResult:
        yield Label("You" if self.role == "user" else "Assistant", classes="who")
        yield Markdown(self.text)

    @property
    def body(self) -> Markdown:
        return self.query_one(Markdown)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+o", "conversations", "Conversations"),
        Binding("ctrl+n", "new", "New"),
        Binding("f2", "rename", "Rename"),
        # priority: the message box would take Ctrl-D/Ctrl-E as delete-right/end (Del and End still do that)
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("ctrl+e", "export", "Export .md", priority=True),
        Binding("f3", "settings", "Settings"),
        Binding("ctrl+b", "back", "Tasks"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.conversation_id: int | None = None
        self.messages: list[dict[str, str]] = []
        self.generating = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._turn: Turn | None = None
        self._live = {"tokens": 0, "prompt": 0, "t0": 0.0}
        self.sidebar_ids: list[int] = []  # the conversations the sidebar lists, in order
        self.flushes = 0  # screen updates with new answer text (the answer arrives in pieces)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-body"):
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="title")
                yield ListView(id="conversations")
            with Vertical(id="chat-main"):
                yield VerticalScroll(id="log")
                yield Static(id="notice", classes="error")
                yield Static(id="stats", classes="hint")
                yield Input(placeholder="Message (Enter sends · Esc stops the answer · F1 help)", id="prompt")
            with VerticalScroll(id="settings"):
                yield Label("System prompt")
                yield Input(id="system", placeholder="none")
                yield Label("Temperature (0 = greedy)")
                yield Input("0.7", id="temperature")
                yield Label("Top-p")
                yield Input("0.95", id="top_p")
                yield Label("Max tokens")
                yield Input("512", id="max_tokens")
                yield Label("Seed (empty = random)")
                yield Input("", id="seed")
        yield Footer()

    def on_mount(self) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self.sub_title = f"Chat · {llm.name} · {llm.engine.name} on {llm.device.spec()}"
        self.query_one("#settings").display = False
        self.refresh_sidebar()
        self.query_one("#prompt", Input).focus()
        self.set_interval(1 / FLUSH_HZ, self._flush)
        self.app.on_cleanup(self._stop.set)  # type: ignore[attr-defined]

    # -- history -----------------------------------------------------------------------

    def _history(self) -> Any | None:
        from hanlin.history import HistoryError

        try:
            return self.app.history  # type: ignore[attr-defined]
        except HistoryError as e:
            self.notice(str(e))
            return None

    def notice(self, text: str) -> None:
        self.query_one("#notice", Static).update(text)
        if text:
            self.app.notify(text, severity="error", timeout=8)

    def refresh_sidebar(self) -> None:
        """Re-list the conversations (newest first); the current one is highlighted."""
        self.run_worker(self._refresh_sidebar(), group="sidebar", exclusive=True)

    async def _refresh_sidebar(self) -> None:
        from hanlin.history import HistoryError

        store = self._history()
        if store is None:
            return
        try:
            convs = store.list()
        except HistoryError as e:
            self.notice(str(e))
            return
        lv = self.query_one("#conversations", ListView)
        await lv.clear()
        items = []
        for c in convs:
            item = ListItem(Label(c.title))
            item.conversation_id = c.id  # type: ignore[attr-defined]
            items.append(item)
        await lv.extend(items)
        ids = [c.id for c in convs]
        lv.index = ids.index(self.conversation_id) if self.conversation_id in ids else None
        self.sidebar_ids = ids

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        cid = getattr(event.item, "conversation_id", None)
        if self.generating or cid is None:
            return
        self.open_conversation(cid)

    def open_conversation(self, cid: int) -> None:
        from hanlin.history import HistoryError

        store = self._history()
        if store is None:
            return
        try:
            conv = store.get(cid)
        except HistoryError as e:
            self.notice(str(e))
            return
        self.conversation_id = cid
        self.messages = [{"role": m.role, "content": m.content} for m in conv.messages if m.role != "system"]
        self.query_one("#system", Input).value = conv.system
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        log.mount_all([Turn(m["role"], m["content"]) for m in self.messages])
        log.scroll_end(animate=False)
        self.notice("")
        self.query_one("#stats", Static).update(f"{conv.title} · {len(self.messages)} messages")
        self.query_one("#prompt", Input).focus()

    # -- sending -----------------------------------------------------------------------

    def _config(self) -> Any:
        from hanlin.backends.base import ConfigError, GenerationConfig

        def number(field: str, kind: type) -> Any:
            text = self.query_one(f"#{field}", Input).value.strip()
            if field == "seed" and not text:
                return None
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"{field.replace('_', ' ')} must be a {kind.__name__}, not {text!r}") from None

        return GenerationConfig(temperature=number("temperature", float), top_p=number("top_p", float),
                                max_tokens=number("max_tokens", int), seed=number("seed", int))  # fmt: skip

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt":
            return
        text = event.value.strip()
        if not text:
            return
        if self.generating:
            self.app.notify("An answer is being written: Esc stops it.", timeout=3)
            return
        from hanlin.backends.base import ConfigError
        from hanlin.history import HistoryError

        try:
            config = self._config()
        except ConfigError as e:
            self.notice(f"Settings: {e}")
            return
        event.input.value = ""
        self.notice("")
        system = self.query_one("#system", Input).value.strip()
        store = self._history()
        if store is not None:
            try:
                if self.conversation_id is None:
                    llm = self.app.session.llm  # type: ignore[attr-defined]
                    self.conversation_id = store.create(_title_of(text), system=system, model=llm.name,
                                                        settings={"temperature": config.temperature, "top_p": config.top_p,
                                                                  "max_tokens": config.max_tokens})  # fmt: skip
                store.add_message(self.conversation_id, "user", text)
            except HistoryError as e:
                self.notice(f"{e}. This conversation stays on screen; it is saved once the history can be written.")
        self.messages.append({"role": "user", "content": text})
        log = self.query_one("#log", VerticalScroll)
        self._turn = Turn("assistant")
        log.mount(Turn("user", text))
        log.mount(self._turn)
        log.scroll_end(animate=False)
        self.refresh_sidebar()
        self.generating = True
        self._stop.clear()
        messages = ([{"role": "system", "content": system}] if system else []) + list(self.messages)
        self._generate(messages, config)

    @work(thread=True, exclusive=True, group="answer")
    def _generate(self, messages: list[dict[str, str]], config: Any) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self._live = {"tokens": 0, "prompt": len(llm.chat_ids(messages)), "t0": time.perf_counter(), "first": None}
        error = None
        stream = None
        try:
            stream = llm.chat(messages, stream=True, config=config)
            for ev in stream:
                if ev.token_id is not None:
                    self._live["tokens"] += 1
                    if self._live["first"] is None:
                        self._live["first"] = time.perf_counter()
                if ev.text:
                    with self._lock:
                        self._pending.append(ev.text)
                if self._stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - shown in the chat, the app goes on
            error = e
        finally:
            if stream is not None:
                stream.close()
        completion = stream.completion if stream is not None else None
        self.app.call_from_thread(self._finished, completion, error, self._stop.is_set())

    def _rate(self) -> float:
        first, n = self._live.get("first"), self._live["tokens"]
        if not first or n < 2:
            return 0.0
        return (n - 1) / max(time.perf_counter() - first, 1e-6)

    def _flush(self) -> None:
        with self._lock:
            chunk, self._pending = "".join(self._pending), []
        if chunk and self._turn is not None:
            self._turn.text += chunk
            self._turn.body.append(chunk)
            self.flushes += 1
            self.query_one("#log", VerticalScroll).scroll_end(animate=False)
        if self.generating:
            llm = self.app.session.llm  # type: ignore[attr-defined]
            used = self._live["prompt"] + self._live["tokens"]
            self.query_one("#stats", Static).update(
                f"writing… {self._live['tokens']} tokens · {self._rate():.1f} tok/s · context {used}/{llm.context_length} · Esc stops"
            )

    def _finished(self, completion: Any, error: Exception | None, stopped: bool) -> None:
        from hanlin.history import HistoryError

        self._flush()
        self.generating = False
        turn, self._turn = self._turn, None
        text = turn.text if turn is not None else ""
        llm = self.app.session.llm  # type: ignore[attr-defined]
        if error is not None:
            self.notice(f"The model failed: {error}")
        n = completion.completion_tokens if completion else 0
        rate = completion.decode_tokens_per_second if completion else 0.0
        used = (completion.prompt_tokens + n) if completion else 0
        status = "stopped" if stopped else (completion.finish_reason if completion else "error")
        self.query_one("#stats", Static).update(f"{status} · {n} tokens · {rate:.1f} tok/s · context {used}/{llm.context_length}")
        if stopped and turn is not None:
            turn.mount(Label("(stopped)", classes="hint"))
        self.messages.append({"role": "assistant", "content": text})
        store = self._history()
        if store is not None and self.conversation_id is not None:
            try:
                store.add_message(self.conversation_id, "assistant", text,
                                  stats={"tokens": n, "tokens_per_s": round(rate, 2), "stopped": stopped,
                                         "finish_reason": status})  # fmt: skip
            except HistoryError as e:
                self.notice(f"{e}. The answer stays on screen.")

    # -- actions -----------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self._stop.set()

    def action_back(self) -> None:
        if self.generating:
            self._stop.set()
        self.app.pop_screen()

    def action_new(self) -> None:
        if self.generating:
            return
        self.conversation_id = None
        self.messages = []
        self.query_one("#log", VerticalScroll).remove_children()
        self.query_one("#stats", Static).update("new conversation")
        self.query_one("#conversations", ListView).index = None
        self.query_one("#prompt", Input).focus()

    def action_conversations(self) -> None:
        lv = self.query_one("#conversations", ListView)
        lv.focus()
        if lv.index is None and self.sidebar_ids:
            lv.index = 0

    def action_settings(self) -> None:
        panel = self.query_one("#settings")
        panel.display = not panel.display
        (self.query_one("#system", Input) if panel.display else self.query_one("#prompt", Input)).focus()

    def _current_title(self) -> str | None:
        from hanlin.history import HistoryError

        store = self._history()
        if store is None or self.conversation_id is None:
            self.app.notify("No conversation is open: send a message or pick one in the sidebar.", timeout=4)
            return None
        try:
            return store.get(self.conversation_id).title
        except HistoryError as e:
            self.notice(str(e))
            return None

    def action_rename(self) -> None:
        title = self._current_title()
        if title is None:
            return

        def done(value: str | None) -> None:
            from hanlin.history import HistoryError

            if value is None or not value.strip():
                return
            try:
                self.app.history.rename(self.conversation_id, value)  # type: ignore[attr-defined]
            except HistoryError as e:
                self.notice(str(e))
            self.refresh_sidebar()

        self.app.push_screen(Ask("New title:", title), done)

    def action_delete(self) -> None:
        title = self._current_title()
        if title is None or self.generating:
            return

        def done(value: str | None) -> None:
            from hanlin.history import HistoryError

            if value is None or value.strip().lower() not in ("y", "yes"):
                return
            try:
                self.app.history.delete(self.conversation_id)  # type: ignore[attr-defined]
            except HistoryError as e:
                self.notice(str(e))
                return
            self.action_new()
            self.refresh_sidebar()

        self.app.push_screen(Ask(f"Delete “{title}”? Type y and Enter:"), done)

    def action_export(self) -> None:
        title = self._current_title()
        if title is None:
            return
        stem = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "conversation"
        default = str(self.app.workdir / f"{stem}.md")  # type: ignore[attr-defined]

        def done(value: str | None) -> None:
            from hanlin.history import HistoryError

            if not value:
                return
            try:
                path = self.app.history.export_markdown(self.conversation_id, value.strip())  # type: ignore[attr-defined]
            except (HistoryError, OSError) as e:
                self.notice(f"Export failed: {e}")
                return
            self.app.notify(f"Saved {path}", timeout=5)

        self.app.push_screen(Ask("Export to Markdown file:", default), done)


def _title_of(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 40 else line[:39] + "…"
