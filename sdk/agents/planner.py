"""The planner: MindSearch's idea (Chen et al. 2024) without its `exec` of model-written code.

    from hanlin.agents import Planner
    for event in Planner(llm, kb).run("How do X and Y differ?"):
        print(event.to_json())    # PlanGraph, NodeUpdate ..., Answer(text, sources)

1. The model writes the plan as JSON, decoded under a schema: a list of sub-questions, each
   with an id and the ids it depends on. MindSearch has the model write Python that builds
   the graph and runs it with exec; here the graph is data, checked before anything runs.
   A node may depend only on nodes listed before it (so the graph has no cycle); an edge to
   an unknown or later node is dropped with a notice. A plan that does not parse (cut off at
   max_tokens) becomes one node: the question itself.
2. Nodes whose dependencies are answered run at once, up to `parallel` at a time: each
   searches (the knowledge base, or any query -> [Source] function) and answers from the
   passages it found and its dependencies' answers. Searches run in parallel; the model
   answers one node at a time (one LLM serves one generation at a time here; a server's
   batching scheduler would take them together).
3. The final answer is written from the nodes' answers and cites the passages they read as
   [1], [2] ...; Answer.sources lists them in that numbering.

Every state change streams out as an event (PlanGraph, then NodeUpdate: waiting, searching,
answering, done or failed, then Answer), so a user watches the graph fill in.
"""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

from . import calls as C
from .events import Answer, Event, NodeUpdate, Notice, PlanGraph, Source
from .search import Searcher, kb_searcher

PLAN_PROMPT = """Break the question into at most {n} simple sub-questions, each answerable by searching documents.
A sub-question that needs another's answer lists that one's id in depends_on (only ids listed before it).

Example. Question: Who wrote the paper that introduced the ARC dataset, and when was it published?
{{"nodes": [{{"id": "q1", "question": "Which paper introduced the ARC dataset?", "depends_on": []}},
 {{"id": "q2", "question": "Who wrote that paper and when was it published?", "depends_on": ["q1"]}}]}}

Question: {question}"""

NODE_PROMPT = """Answer the question from the passages below in one or two sentences. If they do not say, answer "unknown".
{context}
Passages:
{passages}

Question: {question}"""

FINAL_PROMPT = """Answer the question using the findings and the numbered sources below. Cite the sources you use as [1], [2] ...

Findings:
{findings}

Sources:
{sources}

Question: {question}"""

SOURCE_CHARS = 700  # of each passage shown to the model: keeps a small context window from overflowing


class Planner:
    def __init__(self, llm: Any, search: Searcher | Any, *, max_nodes: int = 4, parallel: int = 3, k: int = 3,
                 max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None):  # fmt: skip
        if not 1 <= max_nodes <= 9:
            raise ValueError(f"max_nodes={max_nodes} must be between 1 and 9")
        if parallel < 1:
            raise ValueError(f"parallel={parallel} must be at least 1")
        self.llm = llm
        self.search = search if callable(search) and not hasattr(search, "search") else kb_searcher(search, k)
        self.max_nodes, self.parallel = max_nodes, parallel
        self.sampling = {"temperature": temperature, "seed": seed, "max_tokens": max_tokens}
        self._llm_lock = threading.Lock()

    def schema(self) -> dict[str, Any]:
        ids = [f"q{i}" for i in range(1, self.max_nodes + 1)]
        node = {"type": "object", "properties": {"id": {"enum": ids}, "question": {"type": "string", "minLength": 1},
                                                  "depends_on": {"type": "array", "items": {"enum": ids}}},
                "required": ["id", "question", "depends_on"], "additionalProperties": False}  # fmt: skip
        return {"type": "object", "properties": {"nodes": {"type": "array", "items": node, "minItems": 1, "maxItems": self.max_nodes}},
                "required": ["nodes"], "additionalProperties": False}  # fmt: skip

    def plan(self, question: str) -> tuple[list[dict[str, Any]], list[str]]:
        """The checked graph (nodes in a runnable order) and the notices about what was dropped."""
        prompt = PLAN_PROMPT.format(n=self.max_nodes, question=question)
        with self._llm_lock:
            c = self.llm.chat([{"role": "user", "content": prompt}], json_schema=json.dumps(self.schema()), **self.sampling)
        try:
            raw = C.loads(c.text)["nodes"]
        except (ValueError, KeyError, TypeError):
            return [{"id": "q1", "question": question, "depends_on": []}], ["the plan was cut off; searching for the question itself"]
        return check_graph(raw, question)

    def run(self, question: str) -> Iterator[Event]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        question = question.strip()
        nodes, notices = self.plan(question)
        for text in notices:
            yield Notice(text)
        yield PlanGraph(tuple(nodes))
        for n in nodes:
            yield NodeUpdate(n["id"], "waiting", n["question"])
        results: dict[str, NodeUpdate] = {}
        events: queue.Queue[Event | tuple[str, NodeUpdate]] = queue.Queue()
        running: dict[str, Future[Any]] = {}
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="hanlin-planner") as pool:
            while len(results) < len(nodes):
                for n in nodes:
                    if n["id"] not in results and n["id"] not in running and all(d in results for d in n["depends_on"]):
                        running[n["id"]] = pool.submit(self._node, n, {d: results[d] for d in n["depends_on"]}, events)
                item = events.get()
                if isinstance(item, tuple):  # a node finished (done or failed)
                    node_id, final = item
                    results[node_id] = final
                    running.pop(node_id).result()
                    yield final
                else:
                    yield item
        yield self._final(question, nodes, results)

    def _node(self, node: dict[str, Any], deps: dict[str, NodeUpdate], events: queue.Queue[Any]) -> None:
        nid, q = node["id"], node["question"]
        try:
            events.put(NodeUpdate(nid, "searching", q))
            sources = tuple(self.search(q))
            events.put(NodeUpdate(nid, "answering", q, sources=sources))
            context = "".join(f"Known: {d.question} -> {d.answer or 'unknown'}\n" for d in deps.values())
            passages = "\n".join(f"- ({s.citation}) {s.text[:SOURCE_CHARS]}" for s in sources) or "(none found)"
            prompt = NODE_PROMPT.format(context=context, passages=passages, question=q)
            with self._llm_lock:
                answer = self.llm.chat([{"role": "user", "content": prompt}], **self.sampling).text.strip()
            events.put((nid, NodeUpdate(nid, "done", q, answer=answer, sources=sources)))
        except Exception as e:  # noqa: BLE001 - a failed node is shown as failed; the others go on
            events.put((nid, NodeUpdate(nid, "failed", q, error=f"{type(e).__name__}: {e}")))

    def _final(self, question: str, nodes: list[dict[str, Any]], results: dict[str, NodeUpdate]) -> Answer:
        sources: list[Source] = []
        numbers: dict[str, int] = {}
        findings = []
        for n in nodes:
            r = results[n["id"]]
            cited = []
            for s in r.sources:
                if s.citation not in numbers:
                    sources.append(s)
                    numbers[s.citation] = len(sources)
                cited.append(f"[{numbers[s.citation]}]")
            findings.append(f"- {r.question} -> {r.answer or r.error or 'unknown'} {' '.join(cited)}".rstrip())
        listing = "\n".join(f"[{i}] ({s.citation}) {s.text[:SOURCE_CHARS]}" for i, s in enumerate(sources, 1)) or "(none)"
        prompt = FINAL_PROMPT.format(findings="\n".join(findings), sources=listing, question=question)
        with self._llm_lock:
            text = self.llm.chat([{"role": "user", "content": prompt}], **self.sampling).text.strip()
        return Answer(text, sources=tuple(sources))


def check_graph(raw: Any, question: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Nodes as the model wrote them -> (a graph that runs, notices of what was dropped).
    Ids are unique, dependencies point to nodes listed earlier; empty questions go."""
    nodes: list[dict[str, Any]] = []
    notices: list[str] = []
    seen: set[str] = set()
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        nid, q = str(item.get("id", "")), str(item.get("question", "")).strip()
        if not nid or not q:
            notices.append(f"node {nid or '?'} dropped: no question")
            continue
        if nid in seen:
            notices.append(f"node {nid} dropped: its id is used twice")
            continue
        deps = []
        for d in item.get("depends_on") or []:
            if d in seen and d not in deps:
                deps.append(d)
            else:
                notices.append(f"edge {nid} -> {d} dropped: {d} is not a node listed before {nid}")
        seen.add(nid)
        nodes.append({"id": nid, "question": q, "depends_on": deps})
    if not nodes:
        nodes, notices = [{"id": "q1", "question": question, "depends_on": []}], notices + ["the plan had no usable node; searching for the question itself"]
    return nodes, notices
