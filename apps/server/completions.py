"""POST /v1/completions: the legacy text-completion endpoint (prompt in, text out)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from hanlin.apps.server import generation as G
from hanlin.apps.server.errors import APIError

router = APIRouter()


class CompletionRequest(G.SamplingRequest):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=20)  # here: how many alternatives per token
    echo: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.hanlin
    state.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "a list of several prompts is not supported: send one request per prompt", param="prompt")
        prompt = prompt[0]
    engine = state.llm.engine
    if isinstance(prompt, list):
        vocab = engine.model.config.vocab_size if hasattr(engine, "model") else None
        if not prompt or any(not isinstance(t, int) or t < 0 or (vocab is not None and t >= vocab) for t in prompt):
            raise APIError(400, "prompt token ids must be non-negative integers inside the vocabulary", param="prompt")
        prompt_ids, prompt_text = list(prompt), state.llm.detokenize(prompt)
    else:
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        prompt_ids, prompt_text = state.llm.tokenize(prompt), prompt
    schema = json.dumps({"type": "object"}) if (body.response_format or {}).get("type") == "json_object" else None
    config = G.config_for(state, body, json_schema=schema)
    top = body.logprobs or 0
    rid, created = G.new_id("cmpl"), G.now()
    if body.stream:
        return StreamingResponse(_stream(state, body, prompt_ids, prompt_text, config, top, rid, created), media_type="text/event-stream")
    results = await G.run_choices(state, prompt_ids, config, body.n, top)
    choices = []
    for r in results:
        text = (prompt_text if body.echo else "") + r.text
        lp = G.completion_logprobs(engine, r.events, len(prompt_text) if body.echo else 0) if body.logprobs is not None else None
        choices.append({"index": r.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    completion_tokens = sum(G.count_tokens(r.events) for r in results)
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices,
                         "usage": G.usage(len(prompt_ids), completion_tokens)})  # fmt: skip


async def _stream(state, body: CompletionRequest, prompt_ids, prompt_text, config, top, rid, created):
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return G.sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices, **extra})

    completion_tokens = 0
    try:
        if body.echo:
            for i in range(body.n):
                yield chunk([{"index": i, "text": prompt_text, "logprobs": None, "finish_reason": None}])
        async for i, ev in G.merged_streams(state, prompt_ids, config, body.n, top):
            completion_tokens += ev.token_id is not None
            if not ev.text and not ev.finish_reason and body.logprobs is None:
                continue
            lp = G.completion_logprobs(state.llm.engine, [ev]) if body.logprobs is not None else None
            yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=G.usage(len(prompt_ids), completion_tokens))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield G.sse_error(e)
