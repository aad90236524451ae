"""Data preparation for pre-training: raw web and document text -> filtered, deduplicated token shards.

    from hanlin.data import prepare
    report = prepare(["crawl/", "books.jsonl"], "shards/", workers=8, langs="en,zh", heldout=0.01)
    print(report.table())

or `hanlin data prepare RAW... OUT` (docs/data.md). The parts, in the order a document meets them:

    readers.py   files and folders (.txt .md .jsonl[.gz] .html) -> RawDoc, with its source
    filters.py   HTML main text (trafilatura), language (cld2), Gopher quality and repetition
                 rules, C4 rules; thresholds in FilterConfig
    dedup.py     exact (normalized-text hash) and near-duplicate (MinHash LSH) removal
    pipeline.py  the stages, the multiprocessing executor, the report, writing the shards
                 (hanlin.train.shards' format) atomically
    ray_exec.py  the same per-document stage as a Ray Data job, for a cluster
    errors.py    DataPrepError, NoDocumentsError (both ConfigError)

Importing this package imports no vendor library; trafilatura, pycld2, datasketch, tokenizers
and ray are imported by the functions that use them.
"""

from __future__ import annotations

from hanlin.data.errors import DataPrepError, NoDocumentsError
from hanlin.data.filters import FilterConfig
from hanlin.data.pipeline import Report, prepare

__all__ = ["DataPrepError", "FilterConfig", "NoDocumentsError", "Report", "prepare"]
