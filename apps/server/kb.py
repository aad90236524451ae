"""POST /v1/kb/search and /v1/kb/ask: the knowledge base given with `--kb DIR` (built by
`hanlin kb ingest`), as `hanlin kb search` and `hanlin kb ask` give it.

Everything the knowledge base does (embedding the question with its MiniLM model, FAISS and
BM25) runs on the model thread through `scheduler.call`, between decode steps, as
/v1/embeddings does: torch work must not run a second OpenMP pool beside the decode step's.
A question the calibrated threshold declines (`KnowledgeBase.answerable`) is answered without
the model; any other is answered by `hanlin.rag.answer` on a worker thread, with its one
generation queued on the scheduler like a chat request (generation.SchedulerLLM).

An ingest while the server runs is picked up at the next request: the knowledge base is
reopened when `CURRENT` names a new generation.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hanlin.apps.server import generation as G
from hanlin.apps.server.errors import APIError
from hanlin.backends.base import ConfigError, HanlinError

router = APIRouter()
MAX_K = 50


class ServedKB:
    """The knowledge base at --kb; `live()` (on the model thread) reopens it when an ingest
    has made a new generation live. Built on the model thread (its embedder is torch)."""

    def __init__(self, path: str, embedder: Any = None):
        try:
            from hanlin.rag import KBError, KnowledgeBase
        except ImportError as e:
            raise ConfigError(f"--kb needs the rag extra ({e.name} is missing): pip install -c constraints.txt -e '.[rag,torch]'") from None
        self.path = os.path.expanduser(path)
        self._KnowledgeBase = KnowledgeBase
        kb = KnowledgeBase(self.path)
        self.gen = kb.current()  # named before it is read: a generation made meanwhile is read at the next live()
        if self.gen is None:
            raise KBError(f"--kb {path} holds no knowledge base: run `hanlin kb ingest DIR --kb {path}` first")
        model = kb.manifest["embedding_model"]  # the model it was built with; /v1/embeddings' when that is the same one
        shared = embedder if embedder is not None and getattr(embedder, "name", None) == model else None
        self.kb = kb if model == kb.embedding_model and shared is None else KnowledgeBase(self.path, embedding_model=model, embedder=shared)
        _ = self.kb.manifest, self.kb.embedder  # loaded now: errors at start, not at the first question

    def live(self) -> Any:
        gen = self.kb.current()
        if gen is not None and gen != self.gen:  # an ingest made a new generation live
            fresh = self._KnowledgeBase(self.path, embedding_model=self.kb.embedding_model, embedder=self.kb.embedder)
            _ = fresh.manifest  # loaded here, on the model thread
            self.kb, self.gen = fresh, gen
        return self.kb


def served_kb(state: Any) -> ServedKB:
    if state.kb is None:
        raise APIError(404, "this server has no knowledge base: start it with --kb DIR (a folder made by `hanlin kb ingest`)", code="kb_not_found")
    return state.kb


async def on_model_thread(state: Any, fn: Any) -> Any:
    """fn() on the model thread; a ValueError it raises (an empty question, ...) is a 400, a
    knowledge base that cannot be read a 503."""
    try:
        return await asyncio.wrap_future(state.scheduler.call(fn))
    except (ConfigError, APIError):
        raise
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except HanlinError as e:  # KBError: the index on disk cannot be read
        raise APIError(503, str(e), type="server_error", code="kb_unavailable") from None


def sources(state: Any, query: str, k: int, timeout: float | None = None) -> list[Any]:
    """The k best passages as hanlin.agents Sources, from any thread but the model's (blocks):
    the agents' search tool and the planner's searcher."""
    from hanlin.agents import Source

    kb = served_kb(state)
    return state.scheduler.call(lambda: [Source(h.citation(), h.text) for h in kb.live().search(query, k=k)]).result(timeout)


def _question(text: str, param: str) -> str:
    if not text.strip():
        raise APIError(400, f"{param} is empty", param=param)
    return text.strip()


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    k: int = Field(5, ge=1, le=MAX_K)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    k: int = Field(5, ge=1, le=MAX_K)
    max_tokens: int = Field(256, ge=1, description="tokens of the answer at most (capped by --max-tokens-cap)")


@router.post("/v1/kb/search")
async def kb_search(body: SearchRequest, request: Request):
    state = request.app.state.hanlin
    served = served_kb(state)
    query = _question(body.query, "query")

    def run():
        kb = served.live()
        hits = kb.search(query, k=body.k, mode=body.mode)
        ok, relevance = kb.answerable(query, hits if body.mode == "hybrid" else None)
        return hits, ok, relevance

    hits, ok, relevance = await on_model_thread(state, run)
    data = [{"text": h.text, "path": h.path, "location": h.location, "title": h.title, "citation": h.citation(),
             "score": h.score, "similarity": h.similarity, "bm25": h.bm25} for h in hits]  # fmt: skip
    return {"object": "list", "data": data, "answerable": ok, "relevance": relevance}


@router.post("/v1/kb/ask")
async def kb_ask(body: AskRequest, request: Request):
    from hanlin.rag.answer import answer

    state = request.app.state.hanlin
    served = served_kb(state)
    question = _question(body.question, "question")

    def retrieve():
        from hanlin.rag.index import RELEVANCE_K

        kb = served.live()
        hits = kb.search(question, k=max(body.k, RELEVANCE_K))
        ok, relevance = kb.answerable(question, hits)
        return ok, relevance, (hits[: body.k] if ok else [])

    ok, relevance, hits = await on_model_thread(state, retrieve)
    if not ok:  # declined: the model is not asked
        from hanlin.rag.answer import DECLINED

        return {"answer": DECLINED, "declined": True, "relevance": relevance, "citations": []}
    llm = G.SchedulerLLM(state)
    max_tokens = min(body.max_tokens, state.settings.max_tokens_cap)
    text, used = await G.unless_disconnected(request, asyncio.to_thread(answer, llm, question, hits, max_tokens=max_tokens), llm.cancelled.set)
    citations = [{"n": n, "citation": h.citation(), "path": h.path, "location": h.location} for n, h in enumerate(used, 1)]
    return {"answer": text, "declined": False, "relevance": relevance, "citations": citations}
