"""POST /v1/chat/completions: streaming and not, n, stop, logprobs/top_logprobs,
response_format (json_object, json_schema) and tools with tool_choice.

Tool calls: the tools reach the model through its chat template when the template reads
`tools` (Qwen2.5, Llama 3.1, InternLM2.5 ...); otherwise a system message lists them and asks
for Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format most
open chat models are trained on. tool_choice "required" or a named function constrains
decoding to a JSON call (so the arguments always parse); "auto" lets the model choose and
parses `<tool_call>` blocks out of its answer.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hanlin.apps.server import generation as G
from hanlin.agents.calls import call_schema, parse_calls, template_messages
from hanlin.apps.server.errors import APIError
from hanlin.backends.base import ConfigError

router = APIRouter()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(G.SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = request.app.state.hanlin
    state.check_model(body.model)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tools, forced = _tool_plan(body)
    schema = _schema_for(body, tools, forced)
    messages = _messages_for(state, body, tools)
    try:
        prompt_ids = state.llm.chat_ids(messages, **({"tools": [t.model_dump() for t in tools]} if tools and state.template_reads_tools else {}))
    except ConfigError as e:
        raise APIError(400, str(e), param="messages") from None
    config = G.config_for(state, body, json_schema=schema)
    top = body.top_logprobs or 0
    rid, created = G.new_id("chatcmpl"), G.now()
    if body.stream:
        return StreamingResponse(_stream(state, body, prompt_ids, config, top, rid, created, tools, forced), media_type="text/event-stream")
    results = await G.run_choices(state, prompt_ids, config, body.n, top)
    choices = []
    for r in results:
        message: dict[str, Any] = {"role": "assistant", "content": r.text}
        finish = r.finish_reason
        calls = _tool_calls(r.text, tools, forced) if tools else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        choices.append({"index": r.index, "message": message, "logprobs": G.chat_logprobs(state.llm.engine, r.events) if body.logprobs else None,
                        "finish_reason": finish})  # fmt: skip
    completion_tokens = sum(G.count_tokens(r.events) for r in results)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name, "choices": choices,
                         "usage": G.usage(len(prompt_ids), completion_tokens)})  # fmt: skip


async def _stream(state, body: ChatRequest, prompt_ids, config, top, rid, created, tools, forced):
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return G.sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name, "choices": choices, **extra})

    engine = state.llm.engine
    completion_tokens = 0
    texts = [""] * body.n
    try:
        for i in range(body.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        async for i, ev in G.merged_streams(state, prompt_ids, config, body.n, top):
            completion_tokens += ev.token_id is not None
            texts[i] += ev.text
            finish = ev.finish_reason
            if tools:  # calls are only known whole: the text is sent at the end, as a call or as content
                if not finish:
                    continue
                calls = _tool_calls(texts[i], tools, forced)
                delta: dict[str, Any] = {"tool_calls": [dict(c, index=k) for k, c in enumerate(calls)]} if calls else {"content": texts[i]}
                yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": "tool_calls" if calls else finish}])
                continue
            if not ev.text and not finish and not body.logprobs:
                continue  # nothing to say yet (a partial character, text held back for a stop string)
            lp = G.chat_logprobs(engine, [ev]) if body.logprobs else None
            yield chunk([{"index": i, "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp, "finish_reason": finish}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=G.usage(len(prompt_ids), completion_tokens))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield G.sse_error(e)


def _tool_plan(body: ChatRequest) -> tuple[list[Tool], str | None]:
    """The tools in play and, when the call is forced, "*" (any of them) or the one name."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if not tools:
        raise APIError(400, "tool_choice is set but no tools were given", param="tool_choice")
    if choice == "required":
        return tools, "*"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {t.function.name for t in tools}:
            raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools", param="tool_choice")
        return tools, name
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def _schema_for(body: ChatRequest, tools: list[Tool], forced: str | None) -> str | None:
    if forced:
        return json.dumps(call_schema([t.function.model_dump() for t in tools], None if forced == "*" else forced))
    fmt = body.response_format
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return json.dumps({"type": "object"})
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be {'name': ..., 'schema': {...}}", param="response_format")
        return json.dumps(spec.get("schema", {"type": "object"}))
    raise APIError(400, f"response_format.type {fmt.get('type')!r} is not one of text, json_object, json_schema", param="response_format")


def _messages_for(state, body: ChatRequest, tools: list[Tool]) -> list[dict[str, Any]]:
    messages = []
    for m in body.messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            msg["content"] = "".join(p.text or "" for p in m.content if p.type == "text")
        msg.setdefault("content", None)
        messages.append(msg)
    return template_messages(messages, [t.function.model_dump() for t in tools], state.template_reads_tools)


def _tool_calls(text: str, tools: list[Tool], forced: str | None) -> list[dict[str, Any]]:
    """Calls in the model's answer: the whole answer when the call was forced (constrained to
    JSON), else every <tool_call> block naming a known tool with an arguments object."""
    return [{"id": G.new_id("call"), "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for name, args in parse_calls(text, [t.function.name for t in tools], whole=bool(forced))]  # fmt: skip
