"""Search over a local corpus (a hanlin.rag KnowledgeBase) as an agent tool and as the
planner's source of passages."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .events import Source
from .tools import Tool, ToolError

Searcher = Callable[[str], Sequence[Source]]


def kb_searcher(kb: Any, k: int = 4) -> Searcher:
    """query -> the k best passages of a KnowledgeBase (or of a knowledge base folder)."""
    if isinstance(kb, (str, bytes)) or hasattr(kb, "__fspath__"):
        from hanlin.rag import KnowledgeBase

        kb = KnowledgeBase(kb)
    if kb.current() is None:
        raise ToolError(f"the knowledge base at {kb.path} is empty: run `hanlin kb ingest DIR --kb {kb.path}` first")

    def search(query: str) -> list[Source]:
        return [Source(h.citation(), h.text) for h in kb.search(query, k=k)]

    return search


def search_tool(searcher: Searcher | Any, *, k: int = 4, name: str = "search") -> Tool:
    """A `search(query)` tool over a KnowledgeBase (or any query -> [Source] function): the
    passages come back numbered, each with its file and location, for the model to cite."""
    find = searcher if callable(searcher) and not hasattr(searcher, "search") else kb_searcher(searcher, k)

    def search(query: str) -> str:
        """Search the local documents and return the passages that match, with where each comes from.

        Args:
            query: what to look for, in a few words.
        """
        if not query.strip():
            raise ToolError("search: the query is empty")
        hits = find(query)
        if not hits:
            return "No passage matches."
        return "\n\n".join(f"[{n}] ({s.citation}) {s.text}" for n, s in enumerate(hits, 1))

    return Tool.from_function(search, name=name)
