"""Run task specs against a model: build the requests, answer them (cached), score them.

Each scoring mode is one function from (spec, rows, harness) to metrics; the harness owns
the answer cache, the batching and the progress callback, so a mode never calls the model
directly and every answer it gets is resumable.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from hanlin.backends.base import ConfigError

from .cache import AnswerCache, request_key
from .data import BadRow, Prompter, read_rows, read_text, render, resolve_files
from .spec import TaskSpec, load_spec

Progress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass
class TaskResult:
    task: str
    mode: str
    metrics: dict[str, float]
    n: int
    seconds: float
    bad_rows: list[str] = field(default_factory=list)
    bad_row_count: int = 0
    cached: int = 0  # answers read from the cache instead of asked
    artifacts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Harness:
    def __init__(self, model: Any, *, data_dir: str | None, out_dir: str | None = None, limit: int | None = None,
                 shots: int | None = None, batch_size: int = 8, progress: Progress | None = None):  # fmt: skip
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit {limit} is invalid: it must be >= 1")
        self.model = model
        self.data_dir = data_dir
        self.out_dir = out_dir
        self.limit = limit
        self.shots = shots
        self.batch_size = max(1, batch_size)
        self.progress = progress or (lambda task, done, total: None)
        self.cache = AnswerCache(os.path.join(out_dir, "answers.sqlite") if out_dir else None, model.identity)

    # ---- the one path every model answer takes -----------------------------------------

    def answers(self, task: str, kind: str, requests: Sequence[Any], compute: Callable[[list[Any]], list[Any]], *, chunk: int) -> list[Any]:
        """Answers to requests (JSON-able), from the cache where it has them; the rest are
        computed `chunk` at a time, in order (neighbours share few-shot prefixes), and stored
        per chunk."""
        keys = [request_key(kind, self.model.identity, r) for r in requests]
        have = self.cache.get_many(keys)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in have}.values())  # each missing request once
        total, done = len(set(keys)), len(set(keys)) - len(todo)
        self.progress(task, done, total)
        for s in range(0, len(todo), chunk):
            idx = todo[s : s + chunk]
            res = compute([requests[i] for i in idx])
            new = {keys[i]: r for i, r in zip(idx, res)}
            self.cache.put_many(new)
            have.update(new)
            done += len(idx)
            self.progress(task, done, total)
        return [have[k] for k in keys]

    # ---- tasks -------------------------------------------------------------------------

    def run(self, spec: TaskSpec | str) -> TaskResult:
        spec = load_spec(spec) if isinstance(spec, str) else spec
        t0 = time.perf_counter()
        hits0 = self.cache.hits
        fn = MODES[spec.mode]
        result = fn(spec, self)
        result.seconds = round(time.perf_counter() - t0, 2)
        result.cached = self.cache.hits - hits0
        result.bad_row_count = len(result.bad_rows)
        result.bad_rows = result.bad_rows[:50]  # the report lists the first 50; the count is exact
        return result

    def rows(self, spec: TaskSpec) -> tuple[list[dict[str, Any]], list[BadRow]]:
        paths = spec.data["path"] if isinstance(spec.data["path"], list) else [spec.data["path"]]
        files = [f for p in paths for f in resolve_files(self.data_dir, p, spec.name)]
        rows, bad = read_rows(files, list(spec.data.get("fields", [])), spec.data.get("group"))
        if self.limit is not None:
            group = spec.data.get("group")
            if group:  # --limit N: the first N of each group (lm-eval's --limit per subtask)
                seen: dict[str, int] = {}
                kept = []
                for r in rows:
                    seen[r[group]] = seen.get(r[group], 0) + 1
                    if seen[r[group]] <= self.limit:
                        kept.append(r)
                rows = kept
            else:
                rows = rows[: self.limit]
        return rows, bad

    def write_samples(self, spec: TaskSpec, samples: list[dict[str, Any]]) -> dict[str, str]:
        if not self.out_dir:
            return {}
        path = os.path.join(self.out_dir, "samples", f"{spec.name}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return {"samples": os.path.relpath(path, self.out_dir)}


# --------------------------------------------------------------------------------------
# multiple choice (log-likelihood or generation), with CircularEval
# --------------------------------------------------------------------------------------


def _rotations(spec: TaskSpec, row: dict[str, Any], gold: int) -> list[tuple[dict[str, Any], int]]:
    """(row, gold) for each rotation of the options: rotation r shows option (j + r) % n in
    slot j, so the right answer moves to slot (gold - r) % n. Without circular: the row."""
    if not spec.circular:
        return [(row, gold)]
    fields = spec.score["option_fields"]
    n = len(fields)
    out = []
    for r in range(n):
        rot = dict(row)
        for j, f in enumerate(fields):
            rot[f] = row[fields[(j + r) % n]]
        out.append((rot, (gold - r) % n))
    return out


def _mc_items(spec: TaskSpec, h: Harness) -> tuple[list[dict[str, Any]], list[BadRow], Prompter]:
    rows, bad = h.rows(spec)
    p = Prompter(spec, h.data_dir, h.shots)
    items = []
    for row in rows:
        try:
            gold = p.gold(row)
        except ConfigError as e:
            bad.append(BadRow(*_where(row), str(e)))
            continue
        for k, (rot, g) in enumerate(_rotations(spec, row, gold)):
            items.append({"where": row["_where"], "rotation": k, "gold": g, "context": p.context(rot)})
    return items, bad + p.bad, p


def _where(row: dict[str, Any]) -> tuple[str, int]:
    f, _, line = row.get("_where", "?:0").rpartition(":")
    return f, int(line or 0)


def mode_loglikelihood(spec: TaskSpec, h: Harness) -> TaskResult:
    items, bad, p = _mc_items(spec, h)
    choices = spec.choices or []
    delim = p.target_delim
    reqs = [(it["context"], delim + c) for it in items for c in choices]
    # in file order (a subject's questions share their few-shot prefix), 4 x batch_size questions
    # per call: answers are stored per call, so a kill loses at most one call's worth
    lls = h.answers(spec.name, "loglikelihood", reqs, lambda rs: [list(x) for x in h.model.loglikelihood(rs)],
                    chunk=4 * h.batch_size * len(choices))  # fmt: skip
    for k, it in enumerate(items):
        scores = [lls[k * len(choices) + j][0] for j in range(len(choices))]
        it["loglikelihoods"] = scores
        it["pred"] = max(range(len(choices)), key=scores.__getitem__)
        it["pred_norm"] = max(range(len(choices)), key=lambda j: scores[j] / max(1, len(choices[j])))
    metrics = _mc_metrics(spec, items)
    return TaskResult(spec.name, spec.mode, metrics, _n_questions(items), 0.0, [str(b) for b in bad],
                      artifacts=h.write_samples(spec, [_slim(it) for it in items]))  # fmt: skip


def mode_generate(spec: TaskSpec, h: Harness) -> TaskResult:
    if spec.choices:
        return _generate_choice(spec, h)
    rows, bad = h.rows(spec)
    p = Prompter(spec, h.data_dir, h.shots)
    prompts = [p.context(r) for r in rows]
    outs = _generate(spec, h, prompts)
    ex = spec.extractors()
    norm = _normalizer(spec)
    samples, hits = [], {e.name: 0 for e in ex}
    for row, prompt, out in zip(rows, prompts, outs):
        ref = norm(render(spec.score["reference"], row))
        s = {"where": row["_where"], "reference": ref, "response": out, "extracted": {}, "normalized": {}}
        for e in ex:
            raw = e(out)
            got = s["normalized"][e.name] = norm(raw)
            s["extracted"][e.name] = raw
            hits[e.name] += got == ref
        samples.append(s)
    n = len(rows)
    metric = spec.score.get("metric", "exact_match")
    metrics = {f"{metric},{name}": round(100 * v / n, 2) if n else 0.0 for name, v in hits.items()}
    return TaskResult(spec.name, spec.mode, metrics, n, 0.0, [str(b) for b in bad + p.bad], artifacts=h.write_samples(spec, samples))


def _generate_choice(spec: TaskSpec, h: Harness) -> TaskResult:
    items, bad, _ = _mc_items(spec, h)
    choices = spec.choices or []
    outs = _generate(spec, h, [it["context"] for it in items])
    ex = spec.extractors()
    letter = re.compile("|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True)))
    for it, out in zip(items, outs):
        got = ex[0](out) if ex else (m.group(0) if (m := letter.search(out)) else "")
        it["response"] = out
        it["pred"] = it["pred_norm"] = choices.index(got) if got in choices else -1
    return TaskResult(spec.name, spec.mode, _mc_metrics(spec, items), _n_questions(items), 0.0, [str(b) for b in bad],
                      artifacts=h.write_samples(spec, [_slim(it) for it in items]))  # fmt: skip


def _mc_metrics(spec: TaskSpec, items: list[dict[str, Any]]) -> dict[str, float]:
    first = [it for it in items if it["rotation"] == 0]
    n = len(first)
    if not n:
        return {"acc": 0.0}
    m = {"acc": round(100 * sum(it["pred"] == it["gold"] for it in first) / n, 2)}
    if spec.mode == "loglikelihood":
        m["acc_norm"] = round(100 * sum(it["pred_norm"] == it["gold"] for it in first) / n, 2)
    if spec.circular:
        by_q: dict[str, bool] = {}
        for it in items:
            by_q[it["where"]] = by_q.get(it["where"], True) and it["pred"] == it["gold"]
        m["circular"] = round(100 * sum(by_q.values()) / len(by_q), 2)
    return m


def _n_questions(items: list[dict[str, Any]]) -> int:
    return sum(it["rotation"] == 0 for it in items)


def _slim(it: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in it.items() if k != "context"}


def _generate(spec: TaskSpec, h: Harness, prompts: list[str]) -> list[str]:
    g = spec.generate
    max_tokens = int(g.get("max_tokens", 256))
    stop = list(g.get("stop", []))
    reqs = [{"prompt": pr, "max_tokens": max_tokens, "stop": stop} for pr in prompts]
    # 4 x batch_size prompts per call: an engine with continuous batching keeps batch_size of
    # them decoding, refilling a slot as soon as its answer ends; stored per call
    return h.answers(spec.name, "generate", reqs, lambda rs: h.model.generate([r["prompt"] for r in rs], max_tokens=max_tokens, stop=stop),
                     chunk=4 * h.batch_size)  # fmt: skip


def _normalizer(spec: TaskSpec) -> Callable[[str], str]:
    """lm-eval's exact_match options: regexes_to_ignore removed, then case folded."""
    ignore = [re.compile(x) for x in spec.score.get("ignore", [])]
    fold = bool(spec.score.get("ignore_case", False))

    def norm(s: str) -> str:
        for rx in ignore:
            s = rx.sub("", s)
        s = s.strip()
        return s.lower() if fold else s

    return norm


# --------------------------------------------------------------------------------------
# code execution (HumanEval pass@1)
# --------------------------------------------------------------------------------------


def mode_code(spec: TaskSpec, h: Harness) -> TaskResult:
    from .sandbox import Limits, run_python

    rows, bad = h.rows(spec)
    p = Prompter(spec, h.data_dir, h.shots)
    prompts = [p.context(r) for r in rows]
    outs = _generate(spec, h, prompts)
    sc = spec.score
    limits = Limits(wall_seconds=float(sc.get("timeout", 10)), cpu_seconds=int(math.ceil(float(sc.get("timeout", 10)))),
                    memory_mb=int(sc.get("memory_mb", 512)))  # fmt: skip
    programs = [render(sc["program"], {**r, "completion": o}) for r, o in zip(rows, outs)]

    def execute(progs: list[str]) -> list[dict[str, Any]]:
        res = []
        for prog in progs:
            r = run_python(prog, limits=limits)
            res.append({"status": r.status, "stderr": r.stderr[-500:], "seconds": round(r.seconds, 2)})
        return res

    runs = h.answers(spec.name + ":exec", "execute", [{"program": x, "limits": asdict(limits)} for x in programs],
                     lambda rs: execute([r["program"] for r in rs]), chunk=4)  # fmt: skip
    passed = sum(r["status"] == "passed" for r in runs)
    samples = [{"where": row["_where"], "completion": out, **run} for row, out, run in zip(rows, outs, runs)]
    n = len(rows)
    metrics = {"pass@1": round(100 * passed / n, 2) if n else 0.0}
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return TaskResult(spec.name, spec.mode, metrics, n, 0.0, [str(b) for b in bad + p.bad], artifacts=h.write_samples(spec, samples),
                      notes=[f"outcomes: {json.dumps(statuses, sort_keys=True)}"])  # fmt: skip


# --------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------


def mode_perplexity(spec: TaskSpec, h: Harness) -> TaskResult:
    files = resolve_files(h.data_dir, spec.data["path"], spec.name)
    text = read_text(files)
    ctx = int(spec.score.get("ctx", 512))
    if ctx > h.model.context_length:
        ctx = h.model.context_length
    req = {"sha256": request_key(text), "ctx": ctx, "limit": h.limit}

    def compute(_: list[Any]) -> list[dict[str, Any]]:
        r = h.model.perplexity(text, ctx, h.limit)
        return [{"perplexity": r.perplexity, "tokens": r.tokens_scored, "chunks": r.chunks}]

    (res,) = h.answers(spec.name, "perplexity", [req], compute, chunk=1)
    return TaskResult(spec.name, spec.mode, {"perplexity": round(res["perplexity"], 4)}, res["chunks"], 0.0,
                      notes=[f"{res['tokens']} tokens scored in {res['chunks']} chunks of {ctx} (llama.cpp's method: second half of each chunk)"])  # fmt: skip


# --------------------------------------------------------------------------------------
# needle in a haystack
# --------------------------------------------------------------------------------------


def mode_needle(spec: TaskSpec, h: Harness) -> TaskResult:
    nd = spec.needle
    files = resolve_files(h.data_dir, spec.data["path"], spec.name)
    hay = read_text(files)
    needle, question, answer = nd["text"], nd["question"], str(nd["answer"])
    top = min(h.model.context_length, int(nd.get("max_length", h.model.context_length)))
    room = int(spec.generate.get("max_tokens", 16)) + 64  # the question, the template and the answer
    lengths = sorted({max(64, int(f * top) - room) for f in nd.get("length_fractions", [0.125, 0.25, 0.5, 1.0])})
    if h.limit:
        lengths = lengths[: h.limit]
    depths = [int(d) for d in nd.get("depths", [0, 25, 50, 75, 100])]
    cells, prompts = [], []
    for L in lengths:
        base = _prefix_with_tokens(h.model, hay, L - h.model.token_count(needle) - 8)
        for d in depths:
            text = _insert(base, needle, d)
            prompts.append(render(spec.prompt["text"], {"context": text, "question": question}))
            cells.append((L, d))
    outs = _generate(spec, h, prompts)
    found = [answer.lower() in o.lower() for o in outs]
    grid = {f"{L}@{d}": int(f) for (L, d), f in zip(cells, found)}
    art = {}
    if h.out_dir:
        from .report import needle_heatmap

        png = needle_heatmap(os.path.join(h.out_dir, f"{spec.name}.png"), lengths, depths, found, title=f"{spec.name}: {h.model.name}")
        if png:
            art["heatmap"] = os.path.relpath(png, h.out_dir)
    samples = [{"length": L, "depth": d, "found": f, "response": o} for (L, d), f, o in zip(cells, found, outs)]
    art.update(h.write_samples(spec, samples))
    res = TaskResult(spec.name, spec.mode, {"acc": round(100 * sum(found) / len(found), 2)}, len(found), 0.0, artifacts=art,
                     notes=[f"lengths (tokens) {lengths} x depths (%) {depths}", "grid " + json.dumps(grid)])  # fmt: skip
    return res


def _prefix_with_tokens(model: Any, text: str, n_tokens: int) -> str:
    """The longest prefix of text (cut at a sentence end) of at most n_tokens tokens."""
    lo, hi = 0, min(len(text), n_tokens * 8)
    while lo < hi:  # binary search on characters
        mid = (lo + hi + 1) // 2
        if model.token_count(text[:mid]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > len(cut) // 2 else cut


def _insert(text: str, needle: str, depth: int) -> str:
    """text with needle put at depth% of it, at the nearest sentence boundary before that point."""
    at = len(text) * depth // 100
    if 0 < at < len(text):
        b = text.rfind(". ", 0, at)
        at = b + 1 if b != -1 else at
    return f"{text[:at]} {needle} {text[at:]}".strip()


MODES: dict[str, Callable[[TaskSpec, Harness], TaskResult]] = {
    "loglikelihood": mode_loglikelihood,
    "generate": mode_generate,
    "code": mode_code,
    "perplexity": mode_perplexity,
    "needle": mode_needle,
}
