"""Agents: a model that calls tools until it can answer, streaming typed events as it goes.

    from hanlin.agents import ReActAgent, builtin_tools
    agent = ReActAgent(llm, builtin_tools())
    for event in agent.run("What is 17 * 23?"):   # Thought, ToolCall, ToolOutput, ..., Answer
        print(event.to_json())
    agent.ask("What is 17 * 23?").text              # just the Answer

Three ways to drive the tools, each with its paper's shape:

- ReActAgent (Yao et al. 2022): thought, action, observation, repeated. Each step is one JSON
  object decoded under a schema: {"thought", "tool", "arguments"} for one of the tools (its
  own parameter schema) or {"thought", "answer"}. The thought comes first, so the model
  reasons before it acts.
- ReWOOAgent (Xu et al. 2023): the model writes the whole plan at once (a JSON list of tool
  calls, later ones citing earlier results as #E1, #E2 ...), the tools run without the model,
  then the model answers from the evidence. Two model calls however many tools: cheaper
  than ReAct when the plan is right, blind when it is not.
- FunctionCallingAgent: the model's own tool-call format (see calls.py): it writes prose or
  a <tool_call>; the moment it opens one, decoding switches to the call's JSON schema (the
  way vLLM and SGLang use "structural tags"), so free text stays free and calls always parse.

Every agent stops: after max_steps tool calls the next step may only answer (Answer.stopped
"max_steps"); a call repeated with the same arguments is not run again (the model is told
it already has that result) and after repeat_limit repeats it must answer ("repeated_calls").
A tool never raises into the loop (Toolbox.run); a step cut off by max_tokens is reported
as a notice and the model must answer next.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Iterable, Iterator

from . import calls as C
from .events import Answer, Event, Notice, Thought, ToolCall, ToolOutput
from .tools import Tool, Toolbox

# Text fields carry no maxLength: llama.cpp's grammar compiler expands a bound of n into n
# nested optional rules (400 overflowed its limits and crashed the process here). A step the
# model talks past max_tokens is caught instead (the JSON does not parse) and handled.
THOUGHT = {"type": "string"}


class Agent:
    """The loop's shared parts. Subclasses implement run()."""

    def __init__(self, llm: Any, tools: Toolbox | Iterable[Tool | Any] = (), *, max_steps: int = 6, max_tokens: int = 512,
                 temperature: float = 0.0, seed: int | None = None, system: str | None = None, repeat_limit: int = 2):  # fmt: skip
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be at least 1")
        if repeat_limit < 1:
            raise ValueError(f"repeat_limit={repeat_limit} must be at least 1")
        self.llm = llm
        self.tools = tools if isinstance(tools, Toolbox) else Toolbox(tools)
        self.max_steps, self.max_tokens, self.repeat_limit = max_steps, max_tokens, repeat_limit
        self.temperature, self.seed, self.system = temperature, seed, system
        self._ids = itertools.count(1)

    def run(self, question: str) -> Iterator[Event]:
        raise NotImplementedError

    def ask(self, question: str) -> Answer:
        """Run to the end and return the Answer (every run ends with one)."""
        answer = None
        for event in self.run(question):
            if isinstance(event, Answer):
                answer = event
        assert answer is not None, "an agent run ended without an answer"
        return answer

    # -- shared steps ---------------------------------------------------------------------

    def _sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens}

    def _check_question(self, question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        return question.strip()

    def _call(self, name: str, arguments: dict[str, Any], seen: dict[str, str]) -> Iterator[Event]:
        """Run one call (ToolCall, ToolOutput), or skip a repeat of an earlier one (Notice)."""
        key = f"{name}\0{json.dumps(arguments, sort_keys=True, ensure_ascii=False)}"
        if key in seen:
            yield Notice(f"repeated call {name}({_args_text(arguments)}) not run again: its result is already known")
            return
        call_id = f"call_{next(self._ids)}"
        yield ToolCall(call_id, name, arguments)
        result = self.tools.run(name, arguments)
        seen[key] = result.content
        yield ToolOutput(call_id, name, result.ok, result.content)


def _args_text(arguments: dict[str, Any], limit: int = 120) -> str:
    text = json.dumps(arguments, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tool_lines(tools: Toolbox) -> str:
    return "\n".join(f"- {t.name}: {t.description} Arguments (JSON Schema): {json.dumps(t.parameters, ensure_ascii=False)}" for t in tools)


# ------------------------------------------------------------------------------------------
# ReAct

REACT_SYSTEM = """You answer questions, using tools when they help. The tools:
{tools}

Each reply is one JSON object. To use a tool: {{"thought": "<why>", "tool": "<tool name>", "arguments": {{...}}}}.
You then get the tool's result as an Observation. When you know the answer: {{"thought": "<why>", "answer": "<the answer>"}}."""


def react_schema(tools: Toolbox, *, answer_only: bool = False) -> dict[str, Any]:
    """One ReAct step: a call of one of the tools, or the answer (only the answer when forced)."""
    thought = THOUGHT
    answer = {"type": "object", "properties": {"thought": thought, "answer": {"type": "string", "minLength": 1}},
              "required": ["thought", "answer"], "additionalProperties": False}  # fmt: skip
    if answer_only or not len(tools):
        return answer
    steps = [{"type": "object", "properties": {"thought": thought, "tool": {"const": t.name}, "arguments": t.parameters},
              "required": ["thought", "tool", "arguments"], "additionalProperties": False} for t in tools]  # fmt: skip
    return {"anyOf": steps + [answer]}


class ReActAgent(Agent):
    def run(self, question: str) -> Iterator[Event]:
        question = self._check_question(question)
        system = REACT_SYSTEM.format(tools=_tool_lines(self.tools) or "(none)")
        messages = [{"role": "system", "content": f"{self.system}\n\n{system}" if self.system else system},
                    {"role": "user", "content": question}]  # fmt: skip
        seen: dict[str, str] = {}
        steps = repeats = 0
        forced: str | None = None
        while True:
            if forced is None and steps >= self.max_steps:
                forced = "max_steps"
            if forced is None and repeats >= self.repeat_limit:
                forced = "repeated_calls"
            if forced:
                messages.append({"role": "user", "content": "Answer now, from what you have."})
            c = self.llm.chat(messages, json_schema=json.dumps(react_schema(self.tools, answer_only=bool(forced))), **self._sampling())
            try:
                step = C.loads(c.text)
            except ValueError:
                if forced:  # cut off even when only an answer was allowed: give what there is
                    yield Answer(c.text.strip(), stopped=forced)
                    return
                yield Notice(f"the model's step was cut off at {self.max_tokens} tokens; it must answer now")
                forced = "max_tokens"
                continue
            if step.get("thought", "").strip():
                yield Thought(step["thought"].strip())
            if "answer" in step:
                yield Answer(step["answer"].strip(), stopped=forced)
                return
            messages.append({"role": "assistant", "content": c.text})
            events = list(self._call(step["tool"], step["arguments"], seen))
            yield from events
            last = events[-1]
            if isinstance(last, Notice):
                repeats += 1
                key = f"{step['tool']}\0{json.dumps(step['arguments'], sort_keys=True, ensure_ascii=False)}"
                observation = f"You already called {step['tool']} with these arguments; the result was: {seen[key]}\nDo not repeat a call: answer, or try something else."
            else:
                steps += 1
                observation = last.content  # type: ignore[union-attr]
            messages.append({"role": "user", "content": f"Observation: {observation}"})


# ------------------------------------------------------------------------------------------
# ReWOO

REWOO_PLANNER = """Make a plan to answer the question with these tools:
{tools}

Reply with one JSON object: {{"plan": [{{"thought": "<why this step>", "tool": "<tool name>", "arguments": {{...}}}}, ...]}}.
At most {steps} steps. Step n's result is called #E<n>: a later step can use it by writing #E1, #E2 ... inside a text argument.

Question: {question}"""

REWOO_SOLVER = """Answer the question from the plan and the evidence the tools returned.

{evidence}

Question: {question}
Answer:"""

_EVIDENCE = re.compile(r"#E(\d+)")


def rewoo_schema(tools: Toolbox, max_steps: int) -> dict[str, Any]:
    thought = THOUGHT
    steps = [{"type": "object", "properties": {"thought": thought, "tool": {"const": t.name}, "arguments": t.parameters},
              "required": ["thought", "tool", "arguments"], "additionalProperties": False} for t in tools]  # fmt: skip
    item = steps[0] if len(steps) == 1 else {"anyOf": steps}
    return {"type": "object", "properties": {"plan": {"type": "array", "items": item, "minItems": 1, "maxItems": max_steps}},
            "required": ["plan"], "additionalProperties": False}  # fmt: skip


class ReWOOAgent(Agent):
    def run(self, question: str) -> Iterator[Event]:
        question = self._check_question(question)
        if not len(self.tools):
            raise ValueError("ReWOO plans tool calls: give it at least one tool")
        prompt = REWOO_PLANNER.format(tools=_tool_lines(self.tools), steps=self.max_steps, question=question)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": prompt}]
        c = self.llm.chat(messages, json_schema=json.dumps(rewoo_schema(self.tools, self.max_steps)), **self._sampling())
        try:
            plan = C.loads(c.text)["plan"]
        except (ValueError, KeyError):
            plan = []
            yield Notice(f"the plan was cut off at {self.max_tokens} tokens; answering without tools")
        evidence: list[str] = []
        seen: dict[str, str] = {}
        lines: list[str] = []
        for n, step in enumerate(plan[: self.max_steps], 1):
            if step.get("thought", "").strip():
                yield Thought(step["thought"].strip())
            arguments = _substitute(step["arguments"], evidence)
            events = list(self._call(step["tool"], arguments, seen))
            yield from events
            key = f"{step['tool']}\0{json.dumps(arguments, sort_keys=True, ensure_ascii=False)}"
            evidence.append(seen.get(key, ""))
            lines.append(f"Plan: {step.get('thought', '').strip()}\n#E{n} = {step['tool']}({_args_text(arguments, 400)})\nEvidence: {evidence[-1]}")
        solver = REWOO_SOLVER.format(evidence="\n\n".join(lines) or "(no evidence)", question=question)
        answer = self.llm.chat([{"role": "user", "content": solver}], **self._sampling())
        yield Answer(answer.text.strip())


def _substitute(value: Any, evidence: list[str]) -> Any:
    """#E<n> inside text arguments replaced by step n's result (unknown references stay)."""
    if isinstance(value, str):
        return _EVIDENCE.sub(lambda m: evidence[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(evidence) else m.group(0), value)
    if isinstance(value, dict):
        return {k: _substitute(v, evidence) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, evidence) for v in value]
    return value


# ------------------------------------------------------------------------------------------
# Function calling in the model's own format


class FunctionCallingAgent(Agent):
    """`tool_choice`: "auto" (the model decides when to call) or "required" (the first turn
    must be a call: small models that never open a <tool_call> on their own still use tools)."""

    def __init__(self, llm: Any, tools: Toolbox | Iterable[Tool | Any] = (), *, tool_choice: str = "auto", **options: Any):
        super().__init__(llm, tools, **options)
        if tool_choice not in ("auto", "required"):
            raise ValueError(f"tool_choice={tool_choice!r} must be 'auto' or 'required'")
        self.tool_choice = tool_choice

    @property
    def reads_tools(self) -> bool:
        return bool(getattr(self.llm, "template_reads_tools", False))

    def run(self, question: str) -> Iterator[Event]:
        question = self._check_question(question)
        history: list[dict[str, Any]] = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": question}]
        specs = [C.spec_of(t) for t in self.tools]
        extra = {"tools": [{"type": "function", "function": s} for s in specs]} if specs and self.reads_tools else {}
        seen: dict[str, str] = {}
        steps = repeats = 0
        while True:
            forced = "max_steps" if steps >= self.max_steps else "repeated_calls" if repeats >= self.repeat_limit else None
            tools_now = [] if forced or not specs else specs
            messages = C.template_messages(history, tools_now, self.reads_tools)
            ids = self.llm.chat_ids(messages, **(extra if tools_now else {}))
            if tools_now and self.tool_choice == "required" and steps == 0 and repeats == 0:
                prose, opened = "", True
            elif tools_now:
                prose, opened = self._until_trigger(ids)
            else:
                prose, opened = self.llm.generate_ids(ids, **self._sampling()).text, False
            if not opened:
                yield Answer(prose.strip(), stopped=forced)
                return
            if prose.strip():
                yield Thought(prose.strip())
            head = self.llm.tokenize(prose + C.TRIGGER, add_bos=False)
            call = self.llm.generate_ids(ids + head, json_schema=json.dumps(C.call_schema(specs)), **self._sampling())
            parsed = C.parse_calls(call.text, [s["name"] for s in specs], whole=True)
            if not parsed:
                yield Notice(f"the call was cut off at {self.max_tokens} tokens; the model must answer now")
                steps = self.max_steps
                continue
            name, arguments = parsed[0]
            events = list(self._call(name, arguments, seen))
            yield from events
            key = f"{name}\0{json.dumps(arguments, sort_keys=True, ensure_ascii=False)}"
            call_id = events[0].id if isinstance(events[0], ToolCall) else f"call_{next(self._ids)}"
            history.append({"role": "assistant", "content": prose or None,
                            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]})  # fmt: skip
            if isinstance(events[-1], Notice):
                repeats += 1
                result = f"{seen[key]}\n(You already made this call. Do not repeat it: answer, or try something else.)"
            else:
                steps += 1
                result = events[-1].content  # type: ignore[union-attr]
            history.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": result})

    def _until_trigger(self, ids: list[int]) -> tuple[str, bool]:
        """Free text up to the model's own <tool_call> (True) or to its end (False)."""
        text, last = "", None
        for event in self.llm.generate_ids(ids, stream=True, stop=[C.TRIGGER], **self._sampling()):
            text += event.text
            last = event
        eos = set(getattr(self.llm.engine, "eos_token_ids", ()) or ())
        opened = last is not None and last.finish_reason == "stop" and last.token_id not in eos and last.token_id is not None
        return text, opened


AGENTS = {"react": ReActAgent, "rewoo": ReWOOAgent, "function": FunctionCallingAgent}


def make_agent(kind: str, llm: Any, tools: Toolbox | Iterable[Tool | Any] = (), **options: Any) -> Agent:
    """An agent by name: react, rewoo or function."""
    try:
        cls = AGENTS[kind]
    except KeyError:
        raise ValueError(f"unknown agent {kind!r}; the agents are: {', '.join(AGENTS)}") from None
    return cls(llm, tools, **options)
