"""Inputs of `hanlin data prepare`: files and folders of raw text, one `RawDoc` per document.

    .txt .md            one document per file
    .jsonl (.jsonl.gz)  one document per line, in the field `text_field` (default "text")
    .html .htm          one document per file; its main text is extracted later, in a worker

Folders are walked recursively in sorted order, so the document order (and with it every
"keep the first" decision downstream) is the same on every machine. Every document carries
where it came from (file, and line for JSONL) so the report can point at it. A JSONL line
that is not a JSON object with a string `text_field` is not an error: it becomes a RawDoc of
kind "bad_record" and is accounted as dropped by the rule `bad_record`.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from hanlin.data.errors import DataPrepError

TEXT_EXTS = (".txt", ".md")
JSONL_EXTS = (".jsonl", ".jsonl.gz")
HTML_EXTS = (".html", ".htm")
ALL_EXTS = TEXT_EXTS + JSONL_EXTS + HTML_EXTS


@dataclass
class RawDoc:
    index: int  # position in input order (0-based): the order everything downstream keeps
    source: str  # the file
    location: str  # "" for a whole file, "line N" for a JSONL line
    kind: str  # "text", "html" or "bad_record"
    text: str  # the document (raw HTML for "html"; the reason for "bad_record")


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TEXT_EXTS):
        return "text"
    if low.endswith(JSONL_EXTS):
        return "jsonl"
    if low.endswith(HTML_EXTS):
        return "html"
    return None


def list_files(inputs: Iterable[str]) -> tuple[list[str], list[str]]:
    """(files to read, files skipped for their extension). A missing input is an error naming it."""
    files, skipped = [], []
    for raw in inputs:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    full = os.path.join(root, name)
                    (files if _kind(full) else skipped).append(full)
        elif os.path.isfile(path):
            if _kind(path) is None:
                raise DataPrepError(f"input {raw} has an extension `hanlin data prepare` does not read "
                                    f"(it reads {', '.join(ALL_EXTS)})")
            files.append(path)
        else:
            raise DataPrepError(f"input {raw} does not exist (give files or folders of {', '.join(ALL_EXTS)})")
    return files, skipped


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _jsonl_docs(path: str, text_field: str) -> Iterator[tuple[str, str, str]]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not documents (they still count for line numbers)
            try:
                row = json.loads(line)
            except ValueError as e:
                yield f"line {n}", "bad_record", f"not JSON ({e.msg})"
                continue
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                yield f"line {n}", "bad_record", f"no string field {text_field!r}"
                continue
            yield f"line {n}", "text", row[text_field]


def read_documents(files: Iterable[str], *, text_field: str = "text") -> Iterator[RawDoc]:
    """Every document of `files` in order."""
    index = 0
    for path in files:
        kind = _kind(path)
        try:
            if kind == "jsonl":
                for loc, k, text in _jsonl_docs(path, text_field):
                    yield RawDoc(index, path, loc, k, text)
                    index += 1
            else:
                yield RawDoc(index, path, "", kind, _read_text(path))
                index += 1
        except OSError as e:
            raise DataPrepError(f"cannot read input {path}: {e.strerror or e}") from None
