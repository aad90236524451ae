"""The Agents and Knowledge base screens of the terminal app, driven in Textual's Pilot on the
real default model and the real MiniLM embedder: a ReAct agent's steps and answer drawn as
they come, Esc stopping a run, quitting during one, the planner refused without a knowledge
base; a folder of real files ingested into a knowledge base, searched, asked (and an
unrelated question declined), then the planner answering from it with its nodes reaching
"done"."""

from __future__ import annotations

import pytest

pytest.importorskip("textual", reason="the tui extra is part of dev: pip install -c constraints.txt -e '.[dev]'")

from tui_helpers import recorded_report, run, text_of, wait_until  # noqa: E402

import hanlin  # noqa: E402
from hanlin.apps.tui.agents import AgentsScreen  # noqa: E402
from hanlin.apps.tui.app import HanlinApp  # noqa: E402
from hanlin.devices import get_device  # noqa: E402

pytestmark = pytest.mark.slow

DOCS = {
    "lighthouse.md": "# The Brightwater lighthouse\nThe Brightwater lighthouse was built in 1872 by the engineer Ada Quill.\n"
                     "Its lamp can be seen 24 nautical miles out at sea.\n",
    "orchard.md": "# Hollow Oak orchard\nHollow Oak orchard grows twelve kinds of apple. The harvest starts in late September.\n",
    "timetable.txt": "The harbour ferry leaves Brightwater pier every hour from 7 a.m. to 9 p.m.; the crossing takes 40 minutes.\n",
}


def new_app(tmp_path, model_path: str) -> HanlinApp:
    """The app with the default model loaded on the CPU, as the pickers leave it."""
    app = HanlinApp(report=recorded_report(), history=tmp_path / "h.sqlite", workdir=tmp_path)
    app.session.llm = hanlin.load(model_path, device="cpu", engine="gguf")
    app.session.model = model_path
    app.session.device = get_device("cpu")
    return app


def fill(screen, **values) -> None:
    """Set the form's fields (kind is the Select, the rest are Inputs by id, _ for -)."""
    for key, value in values.items():
        screen.query_one(f"#{key.replace('_', '-')}").value = value


async def open_task(pilot, name: str, kind: type):
    pilot.app.open_task(name)
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, kind) and pilot.app.screen.is_mounted, 10, f"the {name} screen")
    await pilot.pause()
    return pilot.app.screen


def test_react_agent_draws_its_steps_and_answer_and_esc_stops_a_run(tmp_path, default_model_path, monkeypatch):
    monkeypatch.setenv("HANLIN_KB", str(tmp_path / "empty-kb"))

    async def script(pilot):
        screen = await open_task(pilot, "agents", AgentsScreen)
        error = screen.query_one("#agent-error")
        assert screen.query_one("#kb").value == str(tmp_path / "empty-kb")  # the default comes from HANLIN_KB

        # the planner needs a knowledge base: no folder, or an empty one, is a message, not a crash
        fill(screen, question="Who built the lighthouse?", kind="planner", kb="")
        await pilot.press("ctrl+r")
        assert "knowledge base" in text_of(error) and not screen.running
        fill(screen, kb=str(tmp_path / "empty-kb"))
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: not screen.running, 30, "the planner to be refused")
        assert "is empty" in text_of(error) and error.display

        # ReAct, one tool call at most, no knowledge base (so no search tool)
        fill(screen, question="", kind="react", max_steps="1", max_tokens="64", kb="")
        screen.query_one("#question").focus()
        await pilot.press(*"Use the calculator to compute 2 ** 10.", "enter")
        assert screen.running
        await wait_until(pilot, lambda: not screen.running, 120, "the ReAct run")
        assert not error.display, text_of(error)
        kinds = [e.kind for e in screen.events]
        assert kinds[-1] == "answer" and kinds.count("answer") == 1, kinds
        assert {"thought", "tool_call"} & set(kinds), kinds
        steps = screen.query(".event.thought, .event.tool_call, .event.tool_result")
        assert len(steps) == sum(k in ("thought", "tool_call", "tool_result") for k in kinds) >= 1
        if "tool_call" in kinds:  # the call is drawn with its JSON arguments
            call = next(e for e in screen.events if e.kind == "tool_call")
            assert f'"{next(iter(call.arguments))}"' in text_of(screen.query_one(".event.tool_call"))
        answer = screen.query_one(".event.answer")
        assert answer.query_one("Markdown").source.startswith(screen.events[-1].text or "*(an empty answer)*")
        assert "done in" in text_of(screen.query_one("#agent-status"))

        # stopped with Esc at once: the step under way (seconds: a thought and a call, decoded
        # under the schema) ends the run, with no answer
        fill(screen, max_steps="2")
        await pilot.press("ctrl+r", "escape")
        await wait_until(pilot, lambda: not screen.running, 60, "Esc to stop the run")
        assert "stopped" in text_of(screen.query_one("#agent-status"))
        assert "answer" not in [e.kind for e in screen.events] and screen.query(".event.stopped")
        assert not screen.query(".event.answer")

        # quitting while a run is under way: the step ends, then the model is closed, and the app exits cleanly
        await pilot.press("ctrl+r")
        assert screen.running
        await pilot.press("ctrl+q")

    app = new_app(tmp_path, default_model_path)
    run(app, script)
    assert app.return_code == 0 and app.session.llm is None


def test_knowledge_base_ingests_searches_asks_and_the_planner_answers_from_it(tmp_path, default_model_path, minilm_folder, monkeypatch):
    from hanlin.apps.tui.kb import KnowledgeBaseScreen
    from hanlin.rag.answer import DECLINED

    docs, kb_folder = tmp_path / "docs", tmp_path / "kb"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    monkeypatch.setenv("HANLIN_KB", str(kb_folder))

    async def script(pilot):
        app = pilot.app
        screen = await open_task(pilot, "kb", KnowledgeBaseScreen)
        status = screen.query_one("#kb-status")
        await wait_until(pilot, lambda: "empty" in text_of(status), 10, "the knowledge base's state")

        # ingest: the log fills line by line, the summary ends it
        fill(screen, ingest_dir=str(docs))
        await pilot.press("ctrl+o")  # (three small files can be in before the key press returns: no check of busy here)
        await wait_until(pilot, lambda: screen.busy is None, 120, "the ingest")
        lines = list(screen.query_one("#kb-log").lines)
        assert any("read lighthouse.md: 1 chunks" in line for line in lines), lines
        assert any(line.startswith("3 added, 0 changed") for line in lines), lines
        assert "3 files, 3 chunks" in text_of(status) and "not calibrated" in text_of(status)

        # search: the file that says it comes first
        screen.query_one("#query").focus()
        fill(screen, query="Who built the Brightwater lighthouse?")
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.busy is None and screen.hits, 30, "the search")
        table = screen.query_one("#hits")
        assert table.row_count == 3 and table.get_row_at(0)[1].startswith("lighthouse.md")
        assert "relevance" in text_of(status)

        # ask: the loaded model answers from the passages, which are listed as its sources
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: screen.busy is None and screen.answer_text, 60, "the answer")
        assert screen.query_one("#kb-answer-box").display and not screen.query_one("#kb-error").display
        source = screen.query_one("#kb-answer").source
        assert "**Sources**" in source and "1. lighthouse.md" in source

        # calibrated (as `hanlin kb calibrate` does), an unrelated question is declined without the model
        kb = next(iter(app.knowledge_bases.values()))
        kb.calibrate(["Who built the Brightwater lighthouse?", "When does the apple harvest start?", "How long is the ferry crossing?"],
                     ["How do I configure a Kubernetes ingress controller?", "What is the derivative of sin(x)?",
                      "Recommend a fantasy novel."])  # fmt: skip
        fill(screen, query="How do I configure a Kubernetes ingress controller?")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: screen.busy is None and screen.answer_text == DECLINED, 30, "the declined question")
        assert "Ask declines this question" in text_of(status)

        # the planner on the same knowledge base: its nodes reach "done", the answer cites the file
        await pilot.press("ctrl+b")
        agents = await open_task(pilot, "agents", AgentsScreen)
        assert agents.query_one("#kb").value == str(kb_folder)  # the folder used last in this session
        fill(agents, question="Who built the Brightwater lighthouse?", kind="planner", max_steps="2", max_tokens="64")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: not agents.running, 150, "the planner")
        assert not agents.query_one("#agent-error").display, text_of(agents.query_one("#agent-error"))
        kinds = [e.kind for e in agents.events]
        assert kinds[-1] == "answer" and "plan" in kinds, kinds
        nodes = agents.query_one("#nodes")
        assert nodes.display and nodes.row_count >= 1
        assert [nodes.get_cell(key, "state").plain for key in nodes.rows] == ["done"] * nodes.row_count
        answer = agents.events[-1]
        assert any(s.citation.startswith("lighthouse.md") for s in answer.sources)
        assert "lighthouse.md" in agents.query_one(".event.answer Markdown").source

    run(new_app(tmp_path, default_model_path), script)
