"""Knowledge-base benchmark: ingest speed, query latency, retrieval recall and rejection,
on a document collection we did not write (lm-eval's installed task READMEs, 200+ files).

    python tools/bench_kb.py [--docs DIR] [--set tools/kb_eval/lm_eval_readmes.json] [--kb DIR]

Prints one JSON object:
- ingest: files, MiB, seconds, MiB/s and chunks/s of a fresh ingest; seconds of a second,
  unchanged ingest (the incremental path, nothing read or embedded);
- query latency p50/p99 of `search` over every question of the set (embedding included);
- recall@1 and recall@5 (a good question's labeled file among the top-k hits' files), for
  hybrid search and, measured in the same run on the same index, its two baselines: dense
  only and BM25 only;
- rejection: the threshold fitted by `calibrate` on the first half of the good and bad
  questions, then on the held-out second halves: precision and recall of declining (a bad
  question declined is a true positive) and the share of good questions still answered.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def lm_eval_tasks() -> str:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_kb: lm-eval is not installed (it is in the dev extra): pip install -c constraints.txt -e '.[dev]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "tasks")


def minilm() -> str:
    from hanlin.embeddings import resolve_embedding_model

    return resolve_embedding_model("all-minilm-l6-v2")


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", default=None, help="the folder to ingest (default: lm-eval's task READMEs)")
    ap.add_argument("--set", default=str(Path(__file__).parent / "kb_eval" / "lm_eval_readmes.json"))
    ap.add_argument("--kb", default=None, help="where to build the index (default: a temporary folder)")
    ap.add_argument("--embedding-model", default=None, help="default: all-MiniLM-L6-v2")
    args = ap.parse_args()

    from hanlin.embeddings import Embedder
    from hanlin.rag import KnowledgeBase

    docs = args.docs or lm_eval_tasks()
    labeled = json.loads(Path(args.set).read_text())
    tmp = None
    kb_dir = args.kb or (tmp := tempfile.mkdtemp(prefix="hanlin-bench-kb-"))
    folder = args.embedding_model or minilm()
    emb = Embedder(folder, "all-minilm-l6-v2")
    try:
        kb = KnowledgeBase(kb_dir, embedding_model=folder, embedder=emb)
        t0 = time.perf_counter()
        report = kb.ingest(docs)
        ingest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = kb.ingest(docs)
        reingest_s = time.perf_counter() - t0
        assert not again.added and not again.changed, "a second ingest of the same files changed nothing"

        good = labeled["good"]
        bad = labeled["bad"]
        latencies = []
        recall = {m: {1: 0, 5: 0} for m in ("hybrid", "dense", "bm25")}
        misses = []
        for question, label in good:
            for mode in recall:
                t0 = time.perf_counter()
                hits = kb.search(question, k=5, mode=mode)
                if mode == "hybrid":
                    latencies.append(time.perf_counter() - t0)
                files = [h.path for h in hits]
                recall[mode][1] += files[:1] == [label]
                recall[mode][5] += label in files
                if mode == "hybrid" and label not in files:
                    misses.append({"question": question, "label": label, "got": files})
        for q in bad:
            t0 = time.perf_counter()
            kb.search(q, k=5)
            latencies.append(time.perf_counter() - t0)

        half_g, half_b = len(good) // 2, len(bad) // 2
        cal = kb.calibrate([q for q, _ in good[:half_g]], bad[:half_b])
        held_good = [kb.answerable(q)[0] for q, _ in good[half_g:]]
        held_bad = [kb.answerable(q)[0] for q in bad[half_b:]]
        declined_bad = sum(not a for a in held_bad)
        declined_good = sum(not a for a in held_good)
        declined = declined_bad + declined_good
        mib = report.bytes_read / 2**20
        out = {
            "collection": docs,
            "ingest": {"files": len(report.added), "skipped": len(report.skipped), "chunks": report.chunks, "mib": round(mib, 2),
                       "seconds": round(ingest_s, 2), "mib_per_s": round(mib / ingest_s, 3), "chunks_per_s": round(report.chunks / ingest_s, 1),
                       "unchanged_reingest_seconds": round(reingest_s, 3)},
            "query_latency_ms": {"n": len(latencies), "p50": round(1000 * percentile(latencies, 50), 1),
                                 "p99": round(1000 * percentile(latencies, 99), 1), "mean": round(1000 * statistics.mean(latencies), 1)},
            "retrieval": {"questions": len(good), **{f"{m}_recall@{k}": round(v[k] / len(good), 3) for m, v in recall.items() for k in (1, 5)},
                          "hybrid_misses@5": misses},
            "rejection": {"threshold": round(cal["threshold"], 4), "calibration_accuracy": round(cal["accuracy"], 3),
                          "held_out_good": len(held_good), "held_out_bad": len(held_bad),
                          "decline_precision": round(declined_bad / declined, 3) if declined else None,
                          "decline_recall": round(declined_bad / len(held_bad), 3),
                          "good_answered": round(sum(held_good) / len(held_good), 3)},
            "embedding_model": "all-MiniLM-L6-v2", "cpu_threads": os.cpu_count(),
        }  # fmt: skip
        print(json.dumps(out, indent=1, ensure_ascii=False))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
