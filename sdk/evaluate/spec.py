"""Task specs: a benchmark is a small TOML file, not a code path.

A spec names where its rows come from, how a row becomes a prompt (Jinja templates, as
lm-evaluation-harness writes them, so its task files translate line by line), where the
few-shot examples come from, and how an answer is scored. The built-in specs live in
`tasks/` beside this file; `hanlin eval --tasks path/to/my_task.toml` runs a file of one's
own. `base = "cmmlu"` starts from another spec and changes a few keys (cmmlu_circular.toml).

    name = "gsm8k"
    mode = "generate"              # loglikelihood | generate | code | perplexity | needle
    [data]      path = "gsm8k/test.jsonl"          fields = ["question", "answer"]
    [fewshot]   path = "gsm8k/train.jsonl"         shots = 5
    [prompt]    text = "Question: {{ question }}\\nAnswer:"   target = "{{ answer }}"
    [generate]  max_tokens = 256                   stop = ["Question:"]
    [score]     reference = "{{ answer }}"          [score.extractors.flexible] regex = "..."

Modes:
- loglikelihood: multiple choice; each choice is scored as a continuation of the prompt and
  the most likely one is the answer (prompt.choices, prompt.answer). `circular = true` asks
  the same question once per rotation of its options (score.option_fields) and counts it only
  if every rotation is right (OpenCompass's CircularEval).
- generate: the model writes; extractors pull the answer out (regex, group select), and the
  metric compares it with the reference. With prompt.choices it is multiple choice by
  generation (the extracted letter against prompt.answer); circular works there too.
- code: the completion plus the row's tests run in the sandbox (sandbox.py); pass@1.
- perplexity: the data file is one text; llama.cpp's chunked perplexity.
- needle: a needle sentence hidden in a haystack text at several lengths and depths.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from hanlin.backends.base import ConfigError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
MODES = ("loglikelihood", "generate", "code", "perplexity", "needle")


@dataclass(frozen=True)
class Extractor:
    """lm-evaluation-harness's regex filter: findall, take match[select] (a tuple: its first
    non-empty group), strip; no match gives `fallback`."""

    name: str
    regex: str
    select: int = 0
    fallback: str = "[invalid]"

    def __call__(self, text: str) -> str:
        found = re.findall(self.regex, text)
        if not found:
            return self.fallback
        try:
            hit = found[self.select]
        except IndexError:
            hit = found[0]
        if isinstance(hit, tuple):
            hit = next((g for g in hit if g), "")
        return hit.strip()


@dataclass
class TaskSpec:
    name: str
    mode: str
    about: str = ""
    source: str = ""  # the spec file
    data: dict[str, Any] = field(default_factory=dict)
    fewshot: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    names: dict[str, dict[str, str]] = field(default_factory=dict)  # group value -> display name
    circular: bool = False
    needle: dict[str, Any] = field(default_factory=dict)

    @property
    def shots(self) -> int:
        return int(self.fewshot.get("shots", 0))

    @property
    def choices(self) -> list[str] | None:
        return self.prompt.get("choices")

    def extractors(self) -> list[Extractor]:
        out = []
        for name, e in self.score.get("extractors", {}).items():
            out.append(Extractor(name, e["regex"], int(e.get("select", 0)), e.get("fallback", "[invalid]")))
        return out


def builtin_tasks() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(TASKS_DIR) if f.endswith(".toml"))


def load_spec(name_or_path: str) -> TaskSpec:
    """A built-in task by name, or a spec file by path."""
    path = name_or_path if name_or_path.endswith(".toml") else os.path.join(TASKS_DIR, f"{name_or_path}.toml")
    if not os.path.isfile(path):
        if name_or_path.endswith(".toml"):
            raise ConfigError(f"task spec {name_or_path} does not exist")
        raise ConfigError(f"unknown task {name_or_path!r}: built-in tasks are {', '.join(builtin_tasks())}, or give a path to a .toml spec")
    raw = _read(path, seen=())
    return _build(raw, path)


def _read(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"task spec {path}: `base` chain loops back to itself")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"task spec {path} is not valid TOML: {e}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = base if base.endswith(".toml") else os.path.join(TASKS_DIR, f"{base}.toml")
    if not os.path.isfile(base_path):
        raise ConfigError(f"task spec {path}: base {base!r} is not a built-in task or a file")
    merged = _read(base_path, seen + (path,))
    return _merge(merged, raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_TABLES = ("data", "fewshot", "prompt", "generate", "score", "names", "needle")


def _build(raw: dict[str, Any], path: str) -> TaskSpec:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"task spec {path}: {msg}")

    known = {"name", "mode", "about", "circular", *_TABLES}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise bad(f"unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "mode"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise bad(f"`{key}` is required (a string)")
    if raw["mode"] not in MODES:
        raise bad(f"mode {raw['mode']!r} is not one of {', '.join(MODES)}")
    for t in _TABLES:
        if t in raw and not isinstance(raw[t], dict):
            raise bad(f"[{t}] must be a table")
    spec = TaskSpec(name=raw["name"], mode=raw["mode"], about=raw.get("about", ""), source=path,
                    circular=bool(raw.get("circular", False)), **{t: raw.get(t, {}) for t in _TABLES})  # fmt: skip
    if "path" not in spec.data:
        raise bad("[data] needs `path` (relative to the data directory)")
    if spec.mode in ("loglikelihood", "generate", "code") and "text" not in spec.prompt:
        raise bad("[prompt] needs `text` (a Jinja template over the row's fields)")
    if spec.mode == "loglikelihood" and not (spec.choices and "answer" in spec.prompt):
        raise bad("mode loglikelihood needs prompt.choices and prompt.answer (the gold choice)")
    if spec.mode == "generate" and not spec.choices and not (spec.extractors() and "reference" in spec.score):
        raise bad("mode generate needs prompt.choices (multiple choice) or score.extractors and score.reference")
    if spec.circular and not spec.score.get("option_fields"):
        raise bad("circular = true needs score.option_fields (the row fields whose contents rotate)")
    for e in spec.extractors():
        try:
            re.compile(e.regex)
        except re.error as err:
            raise bad(f"extractor {e.name!r} has an invalid regex {e.regex!r}: {err}") from None
    return spec
