"""What chat and completions share: request settings -> GenerationConfig, a choice's tokens
from the scheduler through the shared stop policy, and the OpenAI logprobs shapes; and
SchedulerLLM, the LLM surface the agents and knowledge-base answers call, each generation a
scheduler request."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field

from hanlin.apps.server.errors import APIError
from hanlin.apps.server.scheduler import QueueFull
from hanlin.backends.base import ConfigError, GenerationConfig, StopPolicy, TokenEvent, check_prompt_fits

MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and completions requests share."""

    model_config = ConfigDict(extra="allow")  # OpenAI settings we do not use are accepted and ignored
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # a larger seed once broke the scheduler (torch's generator rejects it)
    response_format: dict[str, Any] | None = None


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(e: APIError) -> str:
    """After the headers went out, an error can only be an event."""
    return sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def config_for(state: Any, req: Any, *, json_schema: str | None = None) -> GenerationConfig:
    """The request's sampling settings over the model's defaults; max_tokens capped by the
    server's max_tokens_cap. Settings OpenAI has and hanlin has not (presence/frequency
    penalties, logit_bias) are accepted and ignored, as most local servers do."""
    base: GenerationConfig = state.default_config
    changes: dict[str, Any] = {"max_tokens": min(req.requested_max_tokens() or state.settings.max_tokens_cap, state.settings.max_tokens_cap)}
    if req.temperature is not None:
        changes["temperature"] = req.temperature
    if req.top_p is not None:
        changes["top_p"] = req.top_p
    if req.seed is not None:
        changes["seed"] = req.seed
    stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
    changes["stop"] = tuple(stop)
    changes["json_schema"] = json_schema
    lp = getattr(req, "logprobs", None)
    changes["logprobs"] = lp is not None and lp is not False  # chat: a bool; completions: how many alternatives
    return base.updated(**changes)


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    events: list[TokenEvent] = field(default_factory=list)


async def stream_choice(state: Any, prompt_ids: Sequence[int], config: GenerationConfig, top_logprobs: int = 0) -> AsyncIterator[TokenEvent]:
    """One choice's TokenEvents as the scheduler produces them; the last has finish_reason.
    Leaving early (a stop string, a client gone) frees the request's slot."""
    ticket, policy = submit(state, prompt_ids, config, top_logprobs, loop=asyncio.get_running_loop())
    deadline = time.monotonic() + state.settings.request_timeout
    try:
        while True:
            try:
                item = await asyncio.wait_for(ticket.aout.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                yield TokenEvent(policy.pending, None, None, "length")  # request_timeout: cut off
                return
            event = next_event(state, policy, item)
            yield event
            if event.finish_reason:
                return
    finally:
        ticket.cancel()  # a no-op for a request that ended; frees the slot of one that did not


def submit(state: Any, prompt_ids: Sequence[int], config: GenerationConfig, top_logprobs: int = 0, loop: Any = None) -> tuple[Any, StopPolicy]:
    """Queue one generation on the scheduler (a full queue is a 429 with Retry-After); returns
    its ticket and the StopPolicy that turns its tokens into TokenEvents."""
    engine = state.llm.engine
    check_prompt_fits(len(prompt_ids), engine.context_length, config)
    room = engine.context_length - len(prompt_ids)
    state.scheduler.check(config)
    try:
        ticket = state.scheduler.submit(prompt_ids, config, min(config.max_tokens or room, room), top_logprobs, loop=loop)
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    return ticket, StopPolicy(token_bytes=engine.token_bytes, eos_ids=engine.eos_token_ids, config=config, room=room)


def next_event(state: Any, policy: StopPolicy, item: Any) -> TokenEvent:
    """One item from a ticket's queue as a TokenEvent: None (the tokens ran out) is the last
    event, an exception from the scheduler is raised, a token goes through the StopPolicy."""
    if item is None:
        return policy.end()
    if isinstance(item, BaseException):
        raise item
    state.metrics.generation_tokens.inc()
    return policy.feed(item)


async def run_choices(state: Any, prompt_ids: Sequence[int], config: GenerationConfig, n: int, top_logprobs: int = 0) -> list[ChoiceResult]:
    """n choices at once (each its own request in the batch; seeded choices get seed + index)."""

    async def one(i: int) -> ChoiceResult:
        cfg = config if config.seed is None or i == 0 else config.updated(seed=config.seed + i)
        out = ChoiceResult(i)
        async for ev in stream_choice(state, prompt_ids, cfg, top_logprobs):
            out.text += ev.text
            out.events.append(ev)
            out.finish_reason = ev.finish_reason
        return out

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def merged_streams(state: Any, prompt_ids: Sequence[int], config: GenerationConfig, n: int, top_logprobs: int = 0) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) for n choices streamed together, in the order tokens arrive."""
    if n == 1:
        async for ev in stream_choice(state, prompt_ids, config, top_logprobs):
            yield 0, ev
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        cfg = config if config.seed is None or i == 0 else config.updated(seed=config.seed + i)
        try:
            async for ev in stream_choice(state, prompt_ids, cfg, top_logprobs):
                await merged.put((i, ev))
        except BaseException as e:  # noqa: BLE001  (handed to the reader, which re-raises)
            await merged.put((i, e))
            return

    tasks = [asyncio.create_task(pump(i)) for i in range(n)]
    try:
        done = 0
        while done < n:
            i, ev = await merged.get()
            if isinstance(ev, BaseException):
                raise ev
            yield i, ev
            if ev.finish_reason:
                done += 1
    finally:
        for t in tasks:
            t.cancel()


def token_text(engine: Any, token_id: int | None) -> tuple[str, list[int]]:
    raw = engine.token_bytes(token_id) if token_id is not None else b""
    return raw.decode("utf-8", "replace"), list(raw)


def chat_logprobs(engine: Any, events: Sequence[TokenEvent]) -> dict[str, Any]:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for ev in events:
        if ev.token_id is None or ev.token_id in engine.eos_token_ids:
            continue
        text, raw = token_text(engine, ev.token_id)
        top = []
        for tid, lp in ev.top_logprobs:
            t, b = token_text(engine, tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(engine: Any, events: Sequence[TokenEvent], offset: int = 0) -> dict[str, Any]:
    """OpenAI legacy completions shape: parallel lists, top_logprobs as {token: logprob}."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for ev in events:
        if ev.token_id is None or ev.token_id in engine.eos_token_ids:
            continue
        text, _ = token_text(engine, ev.token_id)
        tokens.append(text)
        lps.append(ev.logprob)
        tops.append({token_text(engine, tid)[0]: lp for tid, lp in ev.top_logprobs})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def count_tokens(events: Sequence[TokenEvent]) -> int:
    return sum(1 for ev in events if ev.token_id is not None)


class Cancelled(Exception):
    """The run this generation belongs to was given up (its client went away)."""


class SchedulerLLM:
    """The part of hanlin's LLM that the agents and `hanlin.rag.answer` call (chat, chat_ids,
    generate_ids, tokenize, template_reads_tools, engine), for code that runs on a thread of
    its own (an agent run, a knowledge-base answer). Prompts are rendered and tokenized where
    the caller is, as /v1/chat/completions does; every generation is queued on the scheduler
    as a request like any other, so it is batched with chat requests, waits its turn, gets the
    same 429 when the queue is full and the same max_tokens cap; the model itself is never
    touched off the scheduler's thread.

    One object serves one run: `cancelled` (set when its client goes away) ends the generation
    in progress at the next token and refuses the next one; past `deadline` (the server's
    request_timeout from the start of the run) the generation in progress ends with a 504."""

    def __init__(self, state: Any):
        self._state = state
        self._llm = state.llm
        self.engine = state.llm.engine
        self.config: GenerationConfig = state.default_config
        self.template_reads_tools: bool = state.template_reads_tools
        self.name: str = state.model_name
        self.cancelled = threading.Event()
        self.deadline = time.monotonic() + state.settings.request_timeout

    def chat_ids(self, messages: Sequence[Any], **extra: Any) -> list[int]:
        return self._llm.chat_ids(messages, **extra)

    def tokenize(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return self._llm.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(ids)

    def chat(self, messages: Sequence[Any], *, stream: bool = False, config: GenerationConfig | None = None, **overrides: Any):
        return self.generate_ids(self.chat_ids(messages), stream=stream, config=config, **overrides)

    def generate_ids(self, ids: Sequence[int], *, stream: bool = False, config: GenerationConfig | None = None, **overrides: Any):
        """A Completion, or a Stream of TokenEvents (hanlin.llm's own classes) when stream=True."""
        from hanlin.llm import Stream

        cfg = (config or self.config).updated(**overrides)
        cap = self._state.settings.max_tokens_cap
        cfg = cfg.updated(max_tokens=min(cfg.max_tokens or cap, cap))
        s = Stream(self._tokens(list(ids), cfg), len(ids), cfg.logprobs)
        if stream:
            return s
        for _ in s:
            pass
        return s.completion

    def _tokens(self, ids: list[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        state = self._state
        if self.cancelled.is_set():
            raise Cancelled()
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        ticket, policy = submit(state, ids, config)
        try:
            while True:
                if self.cancelled.is_set():
                    raise Cancelled()
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise APIError(504, f"the run took longer than the server's request_timeout ({state.settings.request_timeout:g} s)", type="server_error", code="timeout")
                try:
                    item = ticket.out.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
                event = next_event(state, policy, item)
                yield event
                if event.finish_reason:
                    return
        finally:
            ticket.cancel()  # a no-op for a request that ended; frees the slot of one that did not


async def unless_disconnected(request: Any, work: Any, on_gone: Any, poll: float = 0.5) -> Any:
    """Await `work` (a non-streaming reply being made), giving it up when the client goes away:
    on_gone() is called (to stop the work's thread) and the request ends with a 499 that nobody
    reads. A streaming reply needs none of this: its client going away cancels the stream."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                on_gone()
                raise APIError(499, "the client closed the request", code="client_closed_request")
    finally:
        task.cancel()  # a no-op once it is done
