"""The agents and the planner.

On the real default model (135M, GGUF): every tool call each agent makes, sampled at a high
temperature, validates against its tool's schema (constrained decoding), and every run ends
with one answer. The loop's own rules (step limit, repeated calls, ReWOO's #E references,
the planner's graph checks and parallelism) are driven by a scripted model that checks each
step it is asked for against the JSON schema the loop sent: a loop that asked for the wrong
schema fails there.
"""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
from conftest import run_cli
from hanlin.agents import (
    Answer,
    FunctionCallingAgent,
    NodeUpdate,
    Notice,
    PlanGraph,
    Planner,
    ReActAgent,
    ReWOOAgent,
    Source,
    Thought,
    ToolCall,  # fmt: skip
    ToolOutput,
    ToolsConfig,
    builtin_tools,
    event_from_dict,
    make_agent,
    search_tool,
    tool,
)
from hanlin.agents.planner import check_graph


class Scripted:
    """A stand-in model that says what the script says, after checking that each scripted JSON
    step is valid under the schema the loop asked for."""

    def __init__(self, script):
        self.script = list(script)
        self.schemas: list[dict | None] = []
        self.prompts: list[list[dict]] = []
        self.lock = threading.Lock()

    def chat(self, messages, *, json_schema=None, **_):
        with self.lock:
            self.prompts.append([dict(m) for m in messages])  # as it was then: the loop goes on appending
            schema = json.loads(json_schema) if json_schema else None
            self.schemas.append(schema)
            item = self.script.pop(0)
        if isinstance(item, Cut):
            return type("C", (), {"text": item.text, "finish_reason": "length"})()
        text = item(messages) if callable(item) else item
        if schema is not None:
            jsonschema.validate(json.loads(text), schema)  # raises when the loop asked for the wrong shape
        return type("C", (), {"text": text, "finish_reason": "stop"})()


class Cut:
    """A reply cut off at max_tokens: a prefix of valid JSON, not checked against the schema."""

    def __init__(self, text):
        self.text = text


calls_made: list[str] = []


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    calls_made.append(f"{a}+{b}")
    return a + b


@tool
def echo(text: str) -> str:
    """Say the text back.

    Args:
        text: what to say.
    """
    calls_made.append(text)
    return f"echo: {text}"


@pytest.fixture(autouse=True)
def _reset():
    calls_made.clear()


def step(tool_name=None, thought=None, answer=None, **arguments):
    thought = thought if thought is not None else ("" if answer is not None else "t")
    if answer is not None:
        return json.dumps({"thought": thought, "answer": answer})
    return json.dumps({"thought": thought, "tool": tool_name, "arguments": arguments})


def kinds(events):
    return [e.kind for e in events]


# -- the loop's rules, on a scripted model ------------------------------------------------------


def test_react_runs_tools_and_answers_with_events_in_order():
    llm = Scripted([step("add", "adding", a=2, b=3), step(answer="5")])
    events = list(ReActAgent(llm, [add]).run("2+3?"))
    assert kinds(events) == ["thought", "tool_call", "tool_result", "answer"]
    call, result, answer = events[1], events[2], events[3]
    assert (call.name, call.arguments) == ("add", {"a": 2, "b": 3}) and (result.id, result.ok, result.content) == (call.id, True, "5")
    assert answer == Answer("5") and calls_made == ["2+3"]
    assert "Observation: 5" in llm.prompts[1][-1]["content"]  # the result went back to the model


def test_react_step_limit_forces_an_answer_only_schema():
    llm = Scripted([step("add", a=1, b=1), step("add", a=2, b=2), step(answer="done")])
    answer = ReActAgent(llm, [add], max_steps=2).ask("q")
    assert answer.stopped == "max_steps" and answer.text == "done" and calls_made == ["1+1", "2+2"]
    forced = llm.schemas[-1]
    with pytest.raises(jsonschema.ValidationError):  # the last step could not have been a call
        jsonschema.validate(json.loads(step("add", a=3, b=3)), forced)


def test_repeated_calls_are_not_run_again_and_end_the_loop():
    llm = Scripted([step("add", a=1, b=1), step("add", a=1, b=1), step("add", a=1, b=1), step(answer="2")])
    events = list(ReActAgent(llm, [add], max_steps=6, repeat_limit=2).run("q"))
    assert calls_made == ["1+1"]  # run once, then skipped twice
    assert kinds(events).count("notice") == 2 and sum(isinstance(e, ToolCall) for e in events) == 1
    assert events[-1].stopped == "repeated_calls"
    assert "already called add" in llm.prompts[2][-1]["content"]


def test_a_refused_call_is_a_result_the_model_reads_not_a_crash():
    @tool
    def boom(x: int) -> int:
        """Fail.

        Args:
            x: anything.
        """
        raise RuntimeError("broken tool")

    llm = Scripted([step("boom", x=1), step(answer="gave up")])
    events = list(ReActAgent(llm, [boom]).run("q"))
    out = next(e for e in events if isinstance(e, ToolOutput))
    assert not out.ok and "broken tool" in out.content and events[-1].text == "gave up"


def test_a_step_cut_off_by_max_tokens_is_reported_and_the_model_must_answer():
    llm = Scripted([Cut('{"thought": "I will think for ever and'), step(answer="short")])
    events = list(ReActAgent(llm, [add]).run("q"))
    assert isinstance(events[0], Notice) and "cut off" in events[0].text
    assert events[-1] == Answer("short", stopped="max_tokens")


def test_rewoo_plans_once_fills_evidence_references_and_solves():
    plan = json.dumps({"plan": [{"thought": "sum", "tool": "add", "arguments": {"a": 20, "b": 22}},
                                {"thought": "say it", "tool": "echo", "arguments": {"text": "the sum is #E1"}}]})  # fmt: skip
    llm = Scripted([plan, lambda messages: "42 [from #E2]"])
    events = list(ReWOOAgent(llm, [add, echo]).run("what is 20+22?"))
    assert kinds(events) == ["thought", "tool_call", "tool_result", "thought", "tool_call", "tool_result", "answer"]
    assert calls_made == ["20+22", "the sum is 42"]  # #E1 became the first result
    assert "echo: the sum is 42" in llm.prompts[1][0]["content"]  # the solver saw the evidence
    assert llm.schemas[0]["properties"]["plan"]["maxItems"] == 6


def test_events_round_trip_through_their_json():
    events = [Thought("t"), ToolCall("call_1", "add", {"a": 1}), ToolOutput("call_1", "add", True, "2"), Notice("n"),
              PlanGraph(({"id": "q1", "question": "?", "depends_on": []},)),
              NodeUpdate("q1", "done", "?", "a", (Source("f.md (A)", "text"),)), Answer("x", "max_steps", (Source("f.md", "t"),))]  # fmt: skip
    for e in events:
        assert event_from_dict(json.loads(e.to_json())) == e
    with pytest.raises(ValueError, match="not an agent event"):
        event_from_dict({"type": "nope"})


def test_agents_refuse_bad_settings_by_name():
    with pytest.raises(ValueError, match="max_steps"):
        ReActAgent(Scripted([]), [add], max_steps=0)
    with pytest.raises(ValueError, match="unknown agent 'reflexion'"):
        make_agent("reflexion", Scripted([]), [add])
    with pytest.raises(ValueError, match="tool_choice"):
        FunctionCallingAgent(Scripted([]), [add], tool_choice="always")
    with pytest.raises(ValueError, match="empty"):
        list(ReActAgent(Scripted([]), [add]).run("  "))


# -- the planner ----------------------------------------------------------------------------


def test_the_plan_graph_is_checked_before_anything_runs():
    nodes, notes = check_graph([{"id": "q1", "question": "a", "depends_on": ["q2"]},  # forward edge
                                {"id": "q2", "question": "b", "depends_on": ["q1", "q9"]},
                                {"id": "q2", "question": "dup", "depends_on": []},
                                {"id": "q3", "question": " ", "depends_on": []}], "Q")  # fmt: skip
    assert nodes == [{"id": "q1", "question": "a", "depends_on": []}, {"id": "q2", "question": "b", "depends_on": ["q1"]}]
    assert len(notes) == 4 and any("q1 -> q2" in n for n in notes) and any("used twice" in n for n in notes)
    assert check_graph("garbage", "Q")[0] == [{"id": "q1", "question": "Q", "depends_on": []}]


def test_the_planner_runs_independent_nodes_in_parallel_and_cites_what_they_read():
    active, peak, order = [0], [0], []
    lock = threading.Lock()

    def searcher(query):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            order.append(query)
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        if query == "fails":
            raise OSError("index unreadable")
        return [Source(f"{query}.md (top)", f"all about {query}"), Source("shared.md (s)", "shared")]

    plan = json.dumps({"nodes": [{"id": "q1", "question": "alpha", "depends_on": []}, {"id": "q2", "question": "beta", "depends_on": []},
                                 {"id": "q3", "question": "fails", "depends_on": []},
                                 {"id": "q4", "question": "gamma", "depends_on": ["q1", "q2"]}]})  # fmt: skip
    answers = {"alpha": "A", "beta": "B", "gamma": "G"}
    node = lambda messages: answers[messages[0]["content"].rsplit("Question: ", 1)[1]]  # noqa: E731
    llm = Scripted([plan, node, node, node, lambda messages: "final [1][3]"])
    events = list(Planner(llm, searcher, max_nodes=4, parallel=3).run("Q?"))
    assert isinstance(events[0], PlanGraph) and len(events[0].nodes) == 4
    assert peak[0] >= 2  # independent nodes searched at the same time
    assert order.index("gamma") > max(order.index("alpha"), order.index("beta"))  # after its dependencies
    final = {e.id: e for e in events if isinstance(e, NodeUpdate) and e.state in ("done", "failed")}
    assert final["q3"].state == "failed" and "index unreadable" in final["q3"].error
    assert final["q4"].answer == "G" and "Known: alpha -> A" in llm.prompts[-2][0]["content"]
    answer = events[-1]
    assert isinstance(answer, Answer) and answer.text == "final [1][3]"
    assert [s.citation for s in answer.sources] == ["alpha.md (top)", "shared.md (s)", "beta.md (top)", "gamma.md (top)"]  # shared once
    states = [e.state for e in events if isinstance(e, NodeUpdate) and e.id == "q1"]
    assert states == ["waiting", "searching", "answering", "done"]


# -- on the real default model --------------------------------------------------------------


@pytest.fixture(scope="module")
def box():
    return builtin_tools(ToolsConfig(python=True))


@pytest.mark.parametrize("kind,options", [("react", {}), ("rewoo", {}), ("function", {"tool_choice": "required"})])
def test_every_tool_call_of_the_small_model_validates(llm, box, kind, options):
    calls = 0
    for seed in (1,):
        events = list(make_agent(kind, llm, box, max_steps=2, max_tokens=96, temperature=0.8, seed=seed, **options)
                      .run("What is 17 * 23? Use the calculator."))  # fmt: skip
        assert isinstance(events[-1], Answer) and sum(isinstance(e, Answer) for e in events) == 1
        for i, e in enumerate(events):
            if isinstance(e, ToolCall):
                calls += 1
                box[e.name].validate(e.arguments)  # the arguments follow the tool's schema: constrained decoding
                assert isinstance(events[i + 1], ToolOutput) and events[i + 1].id == e.id
    if kind == "function":
        assert calls >= 1  # a forced first turn is a call (unless cut off, which would show as a notice)


def test_function_calling_in_the_models_own_format_answers_in_prose(llm, box):
    agent = FunctionCallingAgent(llm, box, max_steps=1, max_tokens=48)
    events = list(agent.run("Say hello."))
    assert isinstance(events[-1], Answer) and events[-1].text
    assert not agent.reads_tools  # SmolLM2's template has no tools: they went in a system note


def test_the_planner_answers_from_a_real_knowledge_base(llm, minilm_folder, tmp_path):
    from hanlin.rag import KnowledgeBase

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "serve.md").write_text("# Serving\nA full queue answers HTTP 429 with a Retry-After header.", encoding="utf-8")
    (docs / "finetune.md").write_text("# Fine-tuning\nA stopped run resumes from its last checkpoint with --resume.", encoding="utf-8")
    kb = KnowledgeBase(tmp_path / "kb", embedding_model=minilm_folder)
    kb.ingest(docs)
    events = list(Planner(llm, kb, max_nodes=2, max_tokens=48, k=2).run("What does a full queue answer?"))
    nodes = {e.id: e.state for e in events if isinstance(e, NodeUpdate)}
    assert isinstance(events[0], (PlanGraph, Notice)) and set(nodes.values()) <= {"done"}
    answer = events[-1]
    assert isinstance(answer, Answer) and answer.sources and all(s.citation.split(" ")[0] in ("serve.md", "finetune.md") for s in answer.sources)
    tool_text = search_tool(kb, k=1)("HTTP 429 queue")
    assert tool_text.startswith("[1] (serve.md")


def test_cli_agent_prints_json_events_and_refuses_bad_flags(tmp_path):
    run = run_cli("agent", "What is 2 + 3?", "--device", "cpu", "--max-steps", "1", "--max-tokens", "64", "--json", "--no-python")
    assert run.returncode == 0, run.stderr[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert events[-1]["type"] == "answer" and all(e["type"] in ("thought", "tool_call", "tool_result", "notice", "answer") for e in events)
    bad = run_cli("search", "q", "--kb", str(tmp_path / "none"))
    assert bad.returncode == 2 and "is empty: run `hanlin kb ingest" in bad.stderr
    bad = run_cli("agent", "q", "--max-steps", "0")
    assert bad.returncode == 2 and "--max-steps 0" in bad.stderr
