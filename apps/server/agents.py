"""POST /v1/agents/runs: a question answered by one of hanlin's agents (react, rewoo,
function) or the planner, its typed events (hanlin.agents.events) streamed over SSE as they
happen, or returned together with the answer.

Tools: calculator and python (hanlin.agents.builtin_tools' defaults: the python tool runs
each program in the evaluation sandbox), and `search` over the knowledge base when the server
has one (--kb); the planner needs that knowledge base. No read_file and no http_fetch: a
server gives its clients neither the files of its machine nor its network.

How the agents reach the model. They are plain synchronous loops calling an LLM object
(chat, chat_ids, generate_ids, tokenize), and the model may only be used from the scheduler's
thread. So each run goes on a thread of its own, with a generation.SchedulerLLM in place of
the LLM: every generation the agent asks for is one scheduler request, queued and batched
with the chat requests under the same limits (a full queue ends the run with a 429, the
max_tokens cap applies to each step, request_timeout to the whole run). The run's thread
waits for tokens and runs the tools; knowledge-base searches go to the model thread. A run
whose client goes away (streaming or not) stops at its next token. This keeps the agents'
code as it is, at the price of one thread per run in progress.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hanlin.apps.server import generation as G
from hanlin.apps.server.errors import APIError
from hanlin.apps.server.kb import sources
from hanlin.backends.base import ConfigError, ContextOverflowError

log = logging.getLogger("hanlin.server")
router = APIRouter()
SEARCH_K = 4  # passages the search tool returns


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    agent: Literal["react", "rewoo", "function", "planner"] = "react"
    max_steps: int = Field(6, ge=1, le=20, description="tool calls before the agent must answer")
    max_nodes: int = Field(4, ge=1, le=9, description="planner: sub-questions at most")
    max_tokens: int = Field(512, ge=1, description="tokens per model step (capped by --max-tokens-cap)")
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    tool_choice: Literal["auto", "required"] = Field("auto", description="function agent: must its first turn call a tool?")
    stream: bool = False


@router.post("/v1/agents/runs")
async def agent_runs(body: RunRequest, request: Request):
    state = request.app.state.hanlin
    question = body.question.strip()
    if not question:
        raise APIError(400, "question is empty", param="question")
    if body.agent == "planner" and state.kb is None:
        raise APIError(400, "the planner searches a knowledge base and this server has none: start it with --kb DIR", param="agent")
    if body.tool_choice != "auto" and body.agent != "function":
        raise APIError(400, f"tool_choice is for the function agent, not {body.agent!r}", param="tool_choice")
    llm = G.SchedulerLLM(state)
    events = _events(llm, _runner(state, body, llm), question)
    if body.stream:
        return StreamingResponse(_sse(events), media_type="text/event-stream")

    async def collect() -> list[dict[str, Any]]:
        async with aclosing(events):
            return [event async for event in events]

    try:
        collected = await G.unless_disconnected(request, collect(), llm.cancelled.set)
    except Exception as e:  # noqa: BLE001  (answered in OpenAI's shape)
        raise _api_error(e) from None
    answer = next((e["text"] for e in reversed(collected) if e["type"] == "answer"), "")
    return {"events": collected, "answer": answer}


def _runner(state: Any, body: RunRequest, llm: G.SchedulerLLM) -> Callable[[str], Iterator[Any]]:
    from hanlin.agents import Planner, ToolsConfig, builtin_tools, make_agent, search_tool

    sampling = {"max_tokens": min(body.max_tokens, state.settings.max_tokens_cap), "temperature": body.temperature, "seed": body.seed}
    search = None
    if state.kb is not None:

        def search(query: str) -> list[Any]:
            return sources(state, query, SEARCH_K, timeout=max(0.1, llm.deadline - time.monotonic()))

    if body.agent == "planner":
        return Planner(llm, search, max_nodes=body.max_nodes, **sampling).run
    tools = builtin_tools(ToolsConfig())  # calculator, python
    if search is not None:
        tools.add(search_tool(search))
    options = {"tool_choice": body.tool_choice} if body.agent == "function" else {}
    return make_agent(body.agent, llm, tools, max_steps=body.max_steps, **sampling, **options).run


async def _events(llm: G.SchedulerLLM, run: Callable[[str], Iterator[Any]], question: str) -> AsyncIterator[dict[str, Any]]:
    """The run's events (as dicts) as its thread produces them; leaving early cancels the run."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    end = object()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            llm.cancelled.set()

    def work() -> None:
        try:
            for event in run(question):
                if llm.cancelled.is_set():
                    return
                put(event.to_dict())
            put(end)
        except G.Cancelled:
            return
        except BaseException as e:  # noqa: BLE001  (raised on the HTTP side)
            put(e)

    threading.Thread(target=work, name="hanlin-agent-run", daemon=True).start()
    try:
        while (item := await out.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        llm.cancelled.set()  # a no-op for a run that ended; stops one whose client went away


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async with aclosing(events):
            async for event in events:
                yield G.sse(event)
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001  (after the headers went out, an error can only be an event)
        yield G.sse_error(_api_error(e))


def _api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, f"the run outgrew the context window: {e}", code="context_length_exceeded")
    if isinstance(e, ConfigError):
        return APIError(400, str(e), code="invalid_value")
    log.error("agent run failed", exc_info=e)
    return APIError(500, "internal server error", type="server_error")
