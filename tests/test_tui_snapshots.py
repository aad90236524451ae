"""Every screen of the terminal app at 80x24 and 120x40, compared with its saved SVG snapshot
(pytest-textual-snapshot). After an intended change of a screen, look at the new pictures and
update them: `pytest tests/test_tui_snapshots.py --snapshot-update`.

What would vary between runs is held still: the device report is a recorded one, HANLIN_HOME
is empty, the work folder, the knowledge base folder and the server key are fixed, the
conversation comes from a history written here, agent runs are replayed from events made
here and the knowledge base's hits are made here too (no model runs), and blinking cursors are stopped in their focused (visible) phase before
each picture: a cursor caught half a second later is off, which failed CI once on a slow run."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_textual_snapshot", reason="the dev extra brings pytest-textual-snapshot")

from tui_helpers import recorded_report, wait_until  # noqa: E402

import hanlin  # noqa: E402
from hanlin.apps.tui.app import HanlinApp  # noqa: E402
from hanlin.history import HistoryStore  # noqa: E402

SIZES = [(80, 24), (120, 40)]


async def steady_cursors(pilot) -> None:
    """Stop every blinking cursor (Input, TextArea), shown when its widget has focus."""
    for widget in pilot.app.screen.query("*"):
        if "cursor_blink" in type(widget)._reactives:
            widget.cursor_blink = False  # pauses the blink timer (and hides the cursor) ...
            widget._cursor_visible = widget.has_focus  # ... which the focused one shows again
            widget.refresh()
    await pilot.pause()


@pytest.fixture
def snap(snap_compare):
    """snap_compare with the cursors held still after run_before / press."""

    def compare(app, *, terminal_size, press=(), run_before=None):
        async def before(pilot):
            if run_before is not None:
                await run_before(pilot)
            for key in press:
                await pilot.press(key)
            await pilot.pause()
            await steady_cursors(pilot)

        return snap_compare(app, terminal_size=terminal_size, run_before=before)

    return compare
WORKDIR = "/tmp/hanlin-snapshot-work"  # shown in the fine-tune form; nothing is written there


@pytest.fixture
def make_app(tmp_path, monkeypatch, default_model_path):
    monkeypatch.setenv("HANLIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HANLIN_KB", f"{WORKDIR}/kb")  # shown in the agents and knowledge base forms; never written
    # the default model "in the store" whether this machine has it from the package or a pull
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / os.path.basename(default_model_path)).symlink_to(default_model_path)
    import hanlin.apps.tui.serve as serve

    monkeypatch.setattr(serve.secrets, "token_urlsafe", lambda n: "snapshot-key-0123456789")
    # the fine-tune plan counts this process's resident memory as the framework's share on a CPU
    import hanlin.finetune.plan as plan

    monkeypatch.setattr(plan, "_runtime", lambda kind, runtime: 700 * 2**20 if runtime is None else runtime)
    report = recorded_report()

    def make(loaded: bool = False) -> HanlinApp:
        app = HanlinApp(report=report, history=tmp_path / "history.sqlite", workdir=WORKDIR)
        if loaded:
            app.session.llm = hanlin.load("smollm2-135m-instruct", device=report.cpu(), engine="gguf")
            app.session.model = "smollm2-135m-instruct"
            app.session.device = report.cpu()
        return app

    store = HistoryStore(tmp_path / "history.sqlite")
    cid = store.create("Reverse a list in Python", model="smollm2-135m-instruct")
    store.add_message(cid, "user", "How do I reverse a list in Python?")
    store.add_message(cid, "assistant", "Use slicing or `reversed`:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])\n```\n\n"
                      "- `items[::-1]` makes a new list\n- `items.reverse()` reverses in place")  # fmt: skip
    store.create("A second conversation")
    make.conversation = cid  # type: ignore[attr-defined]
    return make


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_screen(snap, make_app, size):
    assert snap(make_app(), terminal_size=size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_model_screen(snap, make_app, size):
    assert snap(make_app(), terminal_size=size, press=["enter"])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_task_screen(snap, make_app, size):
    async def open_tasks(pilot):
        pilot.app.goto_tasks()
        await pilot.pause()

    assert snap(make_app(loaded=True), terminal_size=size, run_before=open_tasks)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_screen(snap, make_app, size):
    async def open_chat(pilot):
        pilot.app.open_task("chat")
        await pilot.pause()
        chat = pilot.app.screen
        await wait_until(pilot, lambda: len(chat.sidebar_ids) == 2, 10, "the sidebar")
        chat.open_conversation(make_app.conversation)
        await pilot.pause(0.3)

    assert snap(make_app(loaded=True), terminal_size=size, run_before=open_chat)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_settings_panel(snap, make_app, size):
    async def open_settings(pilot):
        pilot.app.open_task("chat")
        await pilot.pause()
        chat = pilot.app.screen
        await wait_until(pilot, lambda: len(chat.sidebar_ids) == 2, 10, "the sidebar")  # it loads on a worker thread
        await pilot.press("f3")
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()  # focusing the system prompt scrolls the panel
        await pilot.pause()

    assert snap(make_app(loaded=True), terminal_size=size, run_before=open_settings)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_finetune_screen(snap, make_app, size):
    async def open_finetune(pilot):
        pilot.app.open_task("finetune")
        await pilot.pause()
        screen = pilot.app.screen
        await wait_until(pilot, lambda: screen.plan is not None, 30, "the memory plan")
        await pilot.pause(0.2)

    assert snap(make_app(loaded=True), terminal_size=size, run_before=open_finetune)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_evaluate_screen(snap, make_app, size):
    async def open_eval(pilot):
        pilot.app.open_task("evaluate")
        await pilot.pause()

    assert snap(make_app(loaded=True), terminal_size=size, run_before=open_eval)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_serve_screen(snap, make_app, size):
    async def open_serve(pilot):
        pilot.app.open_task("serve")
        await pilot.pause()

    assert snap(make_app(loaded=True), terminal_size=size, run_before=open_serve)


def react_run():
    """A ReAct run's events, as the agent streams them (made here: the same picture every time)."""
    from hanlin.agents import Answer, Notice, Thought, ToolCall, ToolOutput

    return [
        Thought("2 ** 10 is a power: the calculator computes it."),
        ToolCall("call_1", "calculator", {"expression": "2 ** 10"}),
        ToolOutput("call_1", "calculator", True, "1024"),
        Thought("Check it in Python too."),
        ToolCall("call_2", "python", {"code": "print(2 ** 10"}),
        ToolOutput("call_2", "python", False, "Error: SyntaxError: '(' was never closed"),
        Notice('repeated call calculator({"expression": "2 ** 10"}) not run again: its result is already known'),
        Answer("2 ** 10 is **1024**.", stopped="max_steps"),
    ]


def planner_run():
    from hanlin.agents import Answer, NodeUpdate, PlanGraph, Source

    lighthouse = Source("lighthouse.md (The Brightwater lighthouse)", "The Brightwater lighthouse was built in 1872 by Ada Quill.")
    q1, q2 = "Who built the Brightwater lighthouse?", "In which year was it built?"
    return [
        PlanGraph(({"id": "q1", "question": q1, "depends_on": []}, {"id": "q2", "question": q2, "depends_on": ["q1"]})),
        NodeUpdate("q1", "waiting", q1), NodeUpdate("q2", "waiting", q2),
        NodeUpdate("q1", "searching", q1), NodeUpdate("q1", "answering", q1, sources=(lighthouse,)),
        NodeUpdate("q1", "done", q1, answer="The engineer Ada Quill built it.", sources=(lighthouse,)),
        NodeUpdate("q2", "searching", q2),
        NodeUpdate("q2", "done", q2, answer="It was built in 1872.", sources=(lighthouse,)),
        Answer("Ada Quill built the Brightwater lighthouse in 1872 [1].", sources=(lighthouse,)),
    ]  # fmt: skip


def replay(question: str, kind: str, events):
    """Open the agents screen and draw `events` as a run would (no model runs)."""

    async def before(pilot):
        pilot.app.open_task("agents")
        await pilot.pause()
        screen = pilot.app.screen
        screen.query_one("#question").value = question
        screen.query_one("#kind").value = kind
        for event in events:
            screen.show(event)
        await pilot.pause(0.3)

    return before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_agents_screen(snap, make_app, size):
    before = replay("What is 2 ** 10?", "react", react_run())
    assert snap(make_app(loaded=True), terminal_size=size, run_before=before)


def test_agents_planner(snap, make_app):
    before = replay("Who built the Brightwater lighthouse, and when?", "planner", planner_run())
    assert snap(make_app(loaded=True), terminal_size=(120, 40), run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_knowledge_base_screen(snap, make_app, size):
    from hanlin.rag import Hit

    hits = [
        Hit("# The Brightwater lighthouse\nThe Brightwater lighthouse was built in 1872 by the engineer Ada Quill.",
            "lighthouse.md", "The Brightwater lighthouse", "The Brightwater lighthouse", 0.0328, 0.593, 2.41),
        Hit("The harbour ferry leaves Brightwater pier every hour from 7 a.m. to 9 p.m.", "timetable.txt", "text", "",
            0.0323, 0.211, 0.87),
        Hit("# Hollow Oak orchard\nHollow Oak orchard grows twelve kinds of apple.", "orchard.md", "Hollow Oak orchard",
            "Hollow Oak orchard", 0.0159, 0.034, 0.0),
    ]  # fmt: skip

    async def asked(pilot):
        pilot.app.open_task("kb")
        await pilot.pause()
        screen = pilot.app.screen
        status = screen.query_one("#kb-status")
        await wait_until(pilot, lambda: "empty" in str(status.render()), 10, "the knowledge base's state")
        screen.query_one("#query").value = "Who built the Brightwater lighthouse?"
        screen._searched(hits, "The Brightwater lighthouse was built in 1872 by the engineer Ada Quill [1].", True, 0.593, None, 1.2)
        await pilot.pause(0.3)

    assert snap(make_app(loaded=True), terminal_size=size, run_before=asked)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help_screen(snap, make_app, size):
    assert snap(make_app(), terminal_size=size, press=["f1"])


def test_light_theme(snap, make_app):
    assert snap(make_app(), terminal_size=(120, 40), press=["ctrl+t"])


def test_too_small_terminal(snap, make_app):
    assert snap(make_app(), terminal_size=(60, 20))
