"""The knowledge base's index: dense vectors (FAISS) plus BM25 (bm25s, jieba for Chinese),
built incrementally and switched atomically.

    kb = KnowledgeBase("~/.cache/hanlin/kb/docs")
    report = kb.ingest("docs/")            # new and changed files indexed, deleted ones dropped
    for hit in kb.search("how do I resume a fine-tune?", k=5):
        print(hit.score, hit.path, hit.location, hit.text[:80])

On disk, a knowledge base is a folder of generations: `gen-000007/` holds manifest.json (each
file's sha256, size and chunk range; the embedding model; the rejection threshold),
chunks.jsonl, vectors.faiss and bm25/. `CURRENT` names the live one. An ingest writes the next
generation beside it as `gen-000008.partial/`, renames it when complete, then replaces
`CURRENT` (a temporary file renamed over it): a crash at any point leaves the previous
generation live and usable. Unchanged files (same sha256) keep their chunks and vectors
without being read or embedded again.

Search fuses the two rankings by reciprocal rank fusion (RRF, k=60, as Elasticsearch and
Vespa do it): BM25 finds exact names and numbers, the embedding finds paraphrases; neither
score scale has to be tuned against the other. Each hit keeps its cosine similarity, which is
what the rejection threshold (calibrate) is fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hanlin.backends.base import HanlinError

from .chunking import Chunk, chunk_sections
from .readers import Unreadable, read_document, walk

__all__ = ["KnowledgeBase", "Hit", "IngestReport", "tokenize", "KBError"]

RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
RELEVANCE_K = 5  # hits whose best similarity is a question's relevance (the rejection test)
_CJK_RUN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[0-9A-Za-z_]+(?:['.-][0-9A-Za-z_]+)*")
_STOP = frozenset("a an and are as at be by for from how i in is it of on or that the this to was what when where which who why with you do does "
                  "的 了 是 在 和 也 就 都 而 及 与 着 或 一个 没有 我们 你们 他们 吗 呢".split())  # fmt: skip


class KBError(HanlinError):
    """A knowledge base that cannot be opened or searched; the message says why."""


def tokenize(text: str) -> list[str]:
    """Words for BM25: lower-cased Latin words and numbers; Chinese runs cut by jieba."""
    out: list[str] = []
    pos = 0
    for m in _CJK_RUN.finditer(text):
        out += _WORD.findall(text[pos : m.start()].lower())
        import jieba

        out += [w for w in jieba.lcut(m.group(0)) if w.strip()]
        pos = m.end()
    out += _WORD.findall(text[pos:].lower())
    return [w for w in out if w not in _STOP] or out


@dataclass
class Hit:
    text: str
    path: str  # relative to the ingested folder
    location: str
    title: str
    score: float  # the fused (RRF) score the ranking uses
    similarity: float  # cosine similarity of the query and this chunk's embedding
    bm25: float

    def citation(self) -> str:
        return f"{self.path} ({self.location})"


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    chunks: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        line = (f"{len(self.added)} added, {len(self.changed)} changed, {len(self.unchanged)} unchanged, {len(self.removed)} removed, "
                f"{len(self.skipped)} skipped; {self.chunks} chunks; {self.bytes_read / 2**20:.1f} MiB read in {self.seconds:.1f} s")  # fmt: skip
        return "\n".join([line] + [f"  skipped {p}: {why}" for p, why in self.skipped])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class KnowledgeBase:
    def __init__(self, path: str | os.PathLike[str], *, embedding_model: str = "all-minilm-l6-v2", embedder: Any = None):
        self.path = Path(path).expanduser()
        self.embedding_model = embedding_model
        self._embedder = embedder
        self._loaded: dict[str, Any] | None = None
        # the planner searches from several threads: the lazy parts are made once, under a lock
        self._lock = threading.RLock()

    # -- the parts ---------------------------------------------------------------------

    @property
    def embedder(self) -> Any:
        with self._lock:
            if self._embedder is None:
                from hanlin.embeddings import Embedder, resolve_embedding_model

                self._embedder = Embedder(resolve_embedding_model(self.embedding_model), self.embedding_model)
            return self._embedder

    def _embed(self, texts: Sequence[str], batch: int = 64):
        import numpy as np

        out = []
        for i in range(0, len(texts), batch):
            embedder = self.embedder
            with self._lock:  # a fast tokenizer is not to be shared by threads ("Already borrowed")
                vecs, _ = embedder.embed(list(texts[i : i + batch]))
            out.append(np.asarray(vecs, dtype="float32"))
        if not out:
            return np.zeros((0, 0), dtype="float32")
        v = np.concatenate(out)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # cosine = inner product

    def current(self) -> Path | None:
        try:
            name = (self.path / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        gen = self.path / name
        return gen if gen.is_dir() else None

    def _load(self) -> dict[str, Any]:
        with self._lock:
            return self._loaded if self._loaded is not None else self._read()

    def _read(self) -> dict[str, Any]:
        import bm25s
        import faiss

        gen = self.current()
        if gen is None:
            raise KBError(f"{self.path} holds no knowledge base yet: run `hanlin kb ingest DIR --kb {self.path}`")
        try:
            manifest = json.loads((gen / "manifest.json").read_text())
            chunks = [json.loads(line) for line in (gen / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
            index = faiss.read_index(str(gen / "vectors.faiss"))
            bm25 = bm25s.BM25.load(str(gen / "bm25")) if chunks else None
        except (OSError, ValueError, RuntimeError) as e:
            raise KBError(f"{gen} is damaged ({e}); ingest again to rebuild it") from None
        if index.ntotal != len(chunks):
            raise KBError(f"{gen} is damaged: {index.ntotal} vectors for {len(chunks)} chunks; ingest again")
        self._loaded = {"gen": gen, "manifest": manifest, "chunks": chunks, "index": index, "bm25": bm25}
        return self._loaded

    @property
    def manifest(self) -> dict[str, Any]:
        return self._load()["manifest"]

    # -- ingest ------------------------------------------------------------------------

    def ingest(self, root: str | os.PathLike[str], *, log: Callable[[str], None] | None = None) -> IngestReport:
        import numpy as np

        log = log or (lambda s: None)
        t0 = time.perf_counter()
        report = IngestReport()
        prev = self._load() if self.current() is not None else None
        if prev is not None and prev["manifest"]["embedding_model"] != self.embedding_model:
            raise KBError(f"{self.path} was built with {prev['manifest']['embedding_model']}, not {self.embedding_model}: use another --kb")
        old_files: dict[str, Any] = prev["manifest"]["files"] if prev else {}
        old_vectors = prev["index"].reconstruct_n(0, prev["index"].ntotal) if prev and prev["index"].ntotal else None

        chunks: list[dict[str, Any]] = []
        reused: list[tuple[int, int, Any]] = []  # (start, end, vectors) kept from the previous generation
        files: dict[str, Any] = {}
        new_texts: list[str] = []
        new_rows: list[int] = []  # positions in `chunks` still to embed
        for found in walk(root):
            if found.refused:
                report.skipped.append((found.relative, found.refused))
                continue
            try:
                digest = _sha256(found.path)
            except OSError as e:
                report.skipped.append((found.relative, f"cannot read it ({e.strerror})"))
                continue
            old = old_files.get(found.relative)
            if old is not None and old["sha256"] == digest:
                start = len(chunks)
                chunks += prev["chunks"][old["start"] : old["end"]]
                reused.append((start, len(chunks), old_vectors[old["start"] : old["end"]]))
                files[found.relative] = {**old, "start": start, "end": len(chunks)}
                report.unchanged.append(found.relative)
                continue
            try:
                sections = read_document(found.path)
            except Unreadable as e:
                report.skipped.append((found.relative, str(e).split(": ", 1)[-1]))
                continue
            report.bytes_read += found.path.stat().st_size
            pieces: list[Chunk] = chunk_sections(sections)
            start = len(chunks)
            for c in pieces:
                chunks.append({"path": found.relative, "location": c.location, "title": c.title, "text": c.text})
                new_rows.append(len(chunks) - 1)
                new_texts.append(c.for_embedding)
            files[found.relative] = {"sha256": digest, "size": found.path.stat().st_size, "start": start, "end": len(chunks)}
            (report.changed if old is not None else report.added).append(found.relative)
            log(f"read {found.relative}: {len(pieces)} chunks")
        report.removed = sorted(set(old_files) - set(files))

        # embed what is new, then put every vector in chunk order
        fresh = self._embed(new_texts) if new_texts else None
        dim = fresh.shape[1] if fresh is not None else (old_vectors.shape[1] if old_vectors is not None else 0)
        matrix = np.zeros((len(chunks), dim), dtype="float32")
        for start, end, block in reused:
            matrix[start:end] = block
        if fresh is not None:
            matrix[new_rows] = fresh

        threshold = prev["manifest"].get("threshold") if prev else None
        manifest = {"version": 1, "embedding_model": self.embedding_model, "dim": int(dim), "files": files,
                    "threshold": threshold, "calibration": prev["manifest"].get("calibration") if prev else None,
                    "root": str(Path(root).resolve()), "updated": time.time()}  # fmt: skip
        self._write_generation(manifest, chunks, matrix)
        report.chunks = len(chunks)
        report.seconds = time.perf_counter() - t0
        return report

    def _write_generation(self, manifest: dict[str, Any], chunks: list[dict[str, Any]], matrix: Any) -> Path:
        import bm25s
        import faiss

        self.path.mkdir(parents=True, exist_ok=True)
        current = self.current()
        number = int(current.name.split("-")[1]) + 1 if current is not None else 1
        final = self.path / f"gen-{number:06d}"
        partial = self.path / f"gen-{number:06d}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash: never live
        partial.mkdir()
        (partial / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1))
        with open(partial / "chunks.jsonl", "w", encoding="utf-8") as f:
            for c in chunks:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        index = faiss.IndexFlatIP(max(int(manifest["dim"]), 1))
        if len(chunks):
            index.add(matrix)
        faiss.write_index(index, str(partial / "vectors.faiss"))
        if chunks:
            bm25 = bm25s.BM25()
            bm25.index([tokenize(f"{c['title']} {c['text']}") or ["_"] for c in chunks], show_progress=False)
            bm25.save(str(partial / "bm25"))
        for p in partial.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        os.replace(partial, final)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".CURRENT.")
        with os.fdopen(fd, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "CURRENT")
        for old in self.path.glob("gen-*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        self._loaded = None
        return final

    # -- search ------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, *, mode: str = "hybrid") -> list[Hit]:
        """The k best chunks. mode "dense" or "bm25" ranks by one side only (the benchmark's
        baselines); "hybrid" fuses both."""
        import numpy as np

        if mode not in ("hybrid", "dense", "bm25"):
            raise ValueError(f"search mode {mode!r}: use hybrid, dense or bm25")
        if not query.strip():
            raise ValueError("an empty question cannot be searched")
        kb = self._load()
        chunks = kb["chunks"]
        if not chunks:
            return []
        n = min(CANDIDATES, len(chunks))
        q = self._embed([query])
        sims, ids = kb["index"].search(q, n)
        dense = {int(i): float(s) for i, s in zip(ids[0], sims[0]) if i >= 0}
        docs, scores = kb["bm25"].retrieve([tokenize(query) or ["_"]], k=n, show_progress=False)
        lexical = {int(i): float(s) for i, s in zip(docs[0], scores[0]) if s > 0}
        fused: dict[int, float] = {}
        rankings = {"dense": [dense], "bm25": [lexical], "hybrid": [dense, lexical]}[mode]
        for ranking in (sorted(r, key=r.get, reverse=True) for r in rankings):
            for rank, i in enumerate(ranking):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused, key=fused.get, reverse=True)[:k]
        missing = [i for i in best if i not in dense]
        if missing:  # a BM25-only hit: its similarity, for the rejection test
            vecs = kb["index"].reconstruct_batch(np.asarray(missing, dtype="int64"))
            for i, v in zip(missing, vecs):
                dense[i] = float(v @ q[0])
        return [Hit(chunks[i]["text"], chunks[i]["path"], chunks[i]["location"], chunks[i]["title"], fused[i], dense[i],
                    lexical.get(i, 0.0)) for i in best]  # fmt: skip

    # -- rejection ---------------------------------------------------------------------

    def relevance(self, query: str, hits: Sequence[Hit] | None = None) -> float:
        """How related the question is to the knowledge base: the best cosine similarity of the
        top RELEVANCE_K hits. `hits`: this query's search(k >= RELEVANCE_K) result, if the caller
        has one (the ranking is deterministic, so its first RELEVANCE_K are the same hits)."""
        if hits is None or len(hits) < RELEVANCE_K:
            hits = self.search(query, k=RELEVANCE_K)
        return max((h.similarity for h in hits[:RELEVANCE_K]), default=0.0)

    def calibrate(self, good: Sequence[str], bad: Sequence[str]) -> dict[str, Any]:
        """Fit the rejection threshold from questions the base should answer (good) and unrelated
        ones (bad): the cut between the two relevance distributions with the most correct
        decisions (ties: the midpoint of the widest gap). Saved in the live generation."""
        if len(good) < 2 or len(bad) < 2:
            raise ValueError("calibration needs at least 2 good and 2 bad example questions")
        g = sorted(self.relevance(q) for q in good)
        b = sorted(self.relevance(q) for q in bad)
        cuts = sorted(set(g + b))
        candidates = [(cuts[i] + cuts[i + 1]) / 2 for i in range(len(cuts) - 1)] or [cuts[0]]

        def correct(t: float) -> int:
            return sum(x >= t for x in g) + sum(x < t for x in b)

        best = max(correct(t) for t in candidates)
        tied = [t for t in candidates if correct(t) == best]
        threshold = tied[len(tied) // 2]
        result = {"threshold": threshold, "good": len(g), "bad": len(b), "correct": best, "accuracy": best / (len(g) + len(b)),
                  "good_scores": [round(x, 4) for x in g], "bad_scores": [round(x, 4) for x in b]}  # fmt: skip
        kb = self._load()
        manifest = dict(kb["manifest"], threshold=threshold, calibration={k: v for k, v in result.items() if not k.endswith("_scores")})
        path = kb["gen"] / "manifest.json"
        fd, tmp = tempfile.mkstemp(dir=kb["gen"], prefix=".manifest.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, ensure_ascii=False, indent=1))
        os.replace(tmp, path)
        kb["manifest"] = manifest
        return result

    def answerable(self, query: str, hits: Sequence[Hit] | None = None) -> tuple[bool, float]:
        """(related enough to answer, its relevance); without calibration everything is related.
        `hits`: as for relevance (saves a second search)."""
        t = self.manifest.get("threshold")
        r = self.relevance(query, hits)
        return (t is None or r >= t), r

