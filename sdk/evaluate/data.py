"""Rows from files, and prompts from rows.

Readers for .jsonl, .jsonl.gz, .json (a list) and .csv; a glob in data.path reads many files
and, with data.group ("subject"), tags each row with its file's stem (CMMLU's one file per
subject). A row that cannot be read (bad JSON, a missing field, a short CSV line) is kept as a
BadRow with its file and line, counted and reported, and the run goes on.

Prompts are Jinja templates over a row's fields (lm-evaluation-harness's doc_to_text /
doc_to_target), joined the way lm-eval joins them: description, then each few-shot example
as text + target_delimiter + target, each followed by fewshot_delimiter, then the question.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from hanlin.backends.base import ConfigError, ModelError

from .spec import TaskSpec


class DataMissing(ModelError):
    """A dataset file the task needs is not where it is expected."""


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def default_data_dir() -> str | None:
    """$HANLIN_DATA_DIR, else ../shared/datasets beside the working directory or the source tree."""
    env = os.environ.get("HANLIN_DATA_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (os.getcwd(), here):
        cand = os.path.normpath(os.path.join(root, "..", "shared", "datasets"))
        if os.path.isdir(cand):
            return cand
    return None


def resolve_files(data_dir: str | None, pattern: str, task: str) -> list[str]:
    if data_dir is None:
        raise DataMissing(f"task {task} needs {pattern} under a data directory: pass --data-dir DIR (or set HANLIN_DATA_DIR)")
    full = os.path.join(data_dir, pattern)
    files = sorted(glob.glob(full)) if any(c in pattern for c in "*?[") else ([full] if os.path.isfile(full) else [])
    if not files:
        raise DataMissing(f"task {task} expects {pattern} in {data_dir} (looked for {full}); see ../shared/datasets/README.md for the sources")
    return files


def read_rows(files: list[str], fields: list[str], group: str | None = None) -> tuple[list[dict[str, Any]], list[BadRow]]:
    rows: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    for path in files:
        stem = os.path.basename(path).split(".")[0]
        for line, row, why in _iter_file(path):
            if why is None:
                missing = [f for f in fields if f not in row or row[f] is None or row[f] == ""]
                if missing:
                    why = f"missing field(s) {missing}"
            if why is not None:
                bad.append(BadRow(path, line, why))
                continue
            if group:
                row[group] = stem
            row["_where"] = f"{os.path.basename(path)}:{line}"
            rows.append(row)
    return rows, bad


def _iter_file(path: str) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    """(line number, row, None) or (line number, {}, why it is bad)."""
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                yield 1, {}, "empty CSV file (no header)"
                return
            for rec in reader:
                line = reader.line_num
                if len(rec) != len(header):
                    yield line, {}, f"{len(rec)} columns where the header has {len(header)}"
                    continue
                yield line, dict(zip(header, rec)), None
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                yield e.lineno, {}, f"invalid JSON: {e.msg}"
                return
            for i, row in enumerate(data if isinstance(data, list) else []):
                yield i + 1, row if isinstance(row, dict) else {}, None if isinstance(row, dict) else "not a JSON object"
            return
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, {}, f"invalid JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield line, {}, f"a JSON {type(row).__name__}, not an object"
                continue
            yield line, row, None


def read_text(files: list[str]) -> str:
    out = io.StringIO()
    for p in files:
        with open(p, encoding="utf-8") as f:
            out.write(f.read())
    return out.getvalue()


# --------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _template(src: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(src)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"template {src!r} is invalid: {e}") from None


def render(src: str, row: dict[str, Any]) -> str:
    import jinja2

    try:
        return _template(src).render(**row)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"template {src!r}: {e.message} (the row has {sorted(k for k in row if not k.startswith('_'))})") from None


class Prompter:
    """Builds the prompt of a row: description + few-shot examples + the row's text."""

    def __init__(self, spec: TaskSpec, data_dir: str | None, shots: int | None = None):
        self.spec = spec
        self.data_dir = data_dir
        self.shots = spec.shots if shots is None else shots
        if self.shots < 0:
            raise ConfigError(f"--shots {self.shots} is invalid: it must be >= 0")
        p = spec.prompt
        self.text = p["text"]
        self.target_delim = p.get("target_delimiter", " ")
        self.fewshot_delim = p.get("fewshot_delimiter", "\n\n")
        self.description = p.get("description", "")
        self._pools: dict[str, list[dict[str, Any]]] = {}
        self.bad: list[BadRow] = []

    def target(self, row: dict[str, Any]) -> str:
        """The text an example shows as its answer in a few-shot prompt."""
        choices = self.spec.choices
        if choices:
            return choices[self.gold(row)]
        return render(self.spec.prompt.get("target", ""), row)

    def gold(self, row: dict[str, Any]) -> int:
        """Index of the right choice (multiple choice)."""
        choices = self.spec.choices or []
        ans = render(self.spec.prompt["answer"], row).strip()
        if ans in choices:
            return choices.index(ans)
        if ans.isdigit() and int(ans) < len(choices):
            return int(ans)
        raise ConfigError(f"{row.get('_where', 'a row')}: answer {ans!r} is not one of the choices {choices}")

    def _pool(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.shots or "path" not in self.spec.fewshot:
            return []
        pattern = render(self.spec.fewshot["path"], row)
        if pattern not in self._pools:
            files = resolve_files(self.data_dir, pattern, self.spec.name)
            rows, bad = read_rows(files, list(self.spec.data.get("fields", [])))
            self.bad += bad
            self._pools[pattern] = rows
        return self._pools[pattern]

    def context(self, row: dict[str, Any]) -> str:
        """The full prompt for row: description, its few-shot examples (the first `shots` of
        the few-shot source, lm-eval's first_n sampler), then the row's text."""
        group = self.spec.data.get("group")
        extra = {}
        if group and self.spec.names.get(group):
            extra[f"{group}_name"] = self.spec.names[group].get(row.get(group, ""), row.get(group, ""))
        full = {**row, **extra}
        pool = self._pool(full)[: self.shots]
        if len(pool) < self.shots:
            raise ConfigError(f"task {self.spec.name}: {self.shots} shots asked but the few-shot source has {len(pool)} rows")
        parts = [render(self.description, full)] if self.description else []
        for ex in pool:
            parts.append(render(self.text, {**ex, **extra}) + self.target_delim + self.target(ex) + self.fewshot_delim)
        parts.append(render(self.text, full))
        return "".join(parts)
