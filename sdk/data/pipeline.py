"""`hanlin data prepare RAW... OUT`: raw text -> filtered, deduplicated, tokenized shards.

The stages (InternLM2's pipeline for web and document text, at the scale of one machine):

    read       files and folders -> RawDoc, in sorted input order              driver
    process    HTML main text, language, Gopher and C4 rules, the exact-dedup   workers
               key and the MinHash signature (`process`, a pure function)
    dedup      exact, then MinHash LSH near-duplicates; first occurrence kept    driver, input order
    tokenize   the Rust tokenizer's encode_batch (its own thread pool)           driver
    write      ShardWriter (.bin + .idx per shard, sha256 in manifest.json)      driver

Workers are a multiprocessing pool (`executor="local"`, imap: results come back in input
order) or Ray Data (`executor="ray"`, see ray_exec.py): the same `process` function either way,
so the output is byte-identical for any worker count and either executor.

Every document read is accounted for: kept, or dropped by the first rule that fired; the
report (OUT/report.json, OUT/report.md) counts each rule and keeps up to five samples of it,
and `kept + sum(dropped) == documents` is checked before anything is renamed into place.

OUT is built in a temporary folder beside it and renamed at the end: an interrupted run
leaves nothing at OUT. When no document survives, nothing is written at OUT either: the
report is saved as OUT.report.json / OUT.report.md and NoDocumentsError says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from hanlin.backends.files import write_text
from hanlin.data.errors import DataPrepError, NoDocumentsError
from hanlin.data.filters import RULES, FilterConfig, check, html_main_text, is_cjk
from hanlin.data.readers import RawDoc, list_files, read_documents

SAMPLES_PER_RULE = 5
SAMPLE_CHARS = 200
ENCODE_BATCH = 256  # documents per encode_batch call on the driver
TOKENIZER_DIR = "tokenizer"


# --------------------------------------------------------------------------------------
# the per-document stage (runs in a worker)
# --------------------------------------------------------------------------------------


@dataclass
class Processed:
    index: int
    source: str
    location: str
    text: str  # as filtered (HTML: its main text); for a dropped document, what the sample shows
    lang: str = ""
    rule: str | None = None  # the rule that dropped it, or None
    key: str = ""  # exact-dedup key (kept documents only)
    sig: Any = None  # (128,) uint64 MinHash signature (kept documents only)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, for the report


def process(raw: RawDoc, cfg: FilterConfig) -> Processed:
    """Everything about one document that does not depend on the others."""
    from hanlin.data.dedup import exact_key, signature

    out = Processed(raw.index, raw.source, raw.location, raw.text)
    if raw.kind == "bad_record":
        out.rule = "bad_record"
        return out
    t0 = time.perf_counter()
    if raw.kind == "html":
        main = html_main_text(raw.text)
        out.seconds["extract"] = time.perf_counter() - t0
        if main is None:
            out.rule = "html_no_main_text"
            return out
        out.text = main
    t1 = time.perf_counter()
    out.text, out.lang, out.rule = check(out.text, cfg)
    t2 = time.perf_counter()
    out.seconds["filter"] = t2 - t1
    if out.rule is None:
        out.key = exact_key(out.text)
        out.sig = signature(out.text, is_cjk(out.text, cfg))
        out.seconds["minhash"] = time.perf_counter() - t2
    return out


def _process_chunk(raws: list[RawDoc], cfg: FilterConfig) -> list[Processed]:
    return [process(r, cfg) for r in raws]


def map_local(raws: Iterable[RawDoc], cfg: FilterConfig, workers: int, chunksize: int = 8) -> Iterator[Processed]:
    """`process` over the documents on a multiprocessing pool, results in input order."""
    import functools
    import multiprocessing as mp

    if workers <= 1:
        for r in raws:
            yield process(r, cfg)
        return
    # fork: the workers inherit the imported modules (no per-worker import of trafilatura);
    # they never touch the tokenizer, so its thread pool is not an issue
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(functools.partial(process, cfg=cfg), raws, chunksize=chunksize)


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------


@dataclass
class Report:
    inputs: list[str]
    out: str
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)  # in input folders, with an extension not read
    documents: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # rule -> documents
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # rule -> [{source, location, text, ...}]
    languages: dict[str, int] = field(default_factory=dict)  # of the kept documents
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {docs, tokens}
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (worker stages summed over workers)
    wall_seconds: float = 0.0
    docs_per_s: float = 0.0
    executor: str = "local"
    workers: int = 1
    tokenizer: str = ""
    eos_id: int = -1
    config: dict[str, Any] = field(default_factory=dict)

    def drop(self, rule: str, p: Processed, **extra: str) -> None:
        self.dropped[rule] = self.dropped.get(rule, 0) + 1
        samples = self.samples.setdefault(rule, [])
        if len(samples) < SAMPLES_PER_RULE:
            samples.append({"source": p.source, "location": p.location, "text": p.text[:SAMPLE_CHARS], **extra})

    def check_accounting(self) -> None:
        if self.kept + sum(self.dropped.values()) != self.documents:
            raise DataPrepError(f"accounting error: {self.kept} kept + {sum(self.dropped.values())} dropped "
                                f"!= {self.documents} documents read (a bug in hanlin data prepare)")

    def rules_in_order(self) -> list[str]:
        return [r for r in RULES if r in self.dropped] + sorted(r for r in self.dropped if r not in RULES)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = {r: self.dropped[r] for r in self.rules_in_order()}
        return d

    def table(self) -> str:
        """The per-rule summary printed on stdout."""
        width = max([len(r) for r in self.dropped] + [len("documents read")])
        rows = [f"{'documents read':<{width}}  {self.documents:>9}"]
        for r in self.rules_in_order():
            n = self.dropped[r]
            rows.append(f"{'  ' + r:<{width}}  {n:>9}  {100 * n / max(self.documents, 1):5.1f}%")
        rows.append(f"{'kept':<{width}}  {self.kept:>9}  {100 * self.kept / max(self.documents, 1):5.1f}%")
        for name, s in self.splits.items():
            rows.append(f"{'  ' + name:<{width}}  {s['docs']:>9}  {s['tokens']:,} tokens")
        rows.append(f"{self.wall_seconds:.1f} s, {self.docs_per_s:.0f} docs/s ({self.executor}, {self.workers} workers)")
        return "\n".join(rows)

    def markdown(self) -> str:
        lines = [f"# hanlin data prepare: {self.out}", "",
                 f"Inputs: {', '.join(self.inputs)} ({self.files} files, {len(self.skipped_files)} skipped for their extension)",
                 f"Tokenizer: {self.tokenizer} (EOS id {self.eos_id})", "",
                 "| | documents | % |", "|---|---:|---:|", f"| read | {self.documents} | 100.0 |"]  # fmt: skip
        for r in self.rules_in_order():
            lines.append(f"| dropped: `{r}` | {self.dropped[r]} | {100 * self.dropped[r] / max(self.documents, 1):.1f} |")
        lines.append(f"| **kept** | **{self.kept}** | {100 * self.kept / max(self.documents, 1):.1f} |")
        lines += ["", "| split | documents | tokens |", "|---|---:|---:|"]
        lines += [f"| {n} | {s['docs']} | {s['tokens']} |" for n, s in self.splits.items()]
        lines += ["", f"{self.wall_seconds:.2f} s wall, {self.docs_per_s:.1f} documents/s, executor {self.executor}, "
                  f"{self.workers} workers. Seconds per stage (worker stages summed over workers):", ""]  # fmt: skip
        lines += [f"- {k}: {v:.2f}" for k, v in self.seconds.items()]
        if self.samples:
            lines += ["", "## Samples of each rule", ""]
        for r in self.rules_in_order():
            lines += [f"### `{r}`", ""]
            for s in self.samples.get(r, []):
                where = s["source"] + (f" {s['location']}" if s["location"] else "")
                dup = f" (duplicate of {s['duplicate_of']})" if s.get("duplicate_of") else ""
                lines.append(f"- {where}{dup}: `{' '.join(s['text'].split())[:SAMPLE_CHARS]}`")
            lines.append("")
        return "\n".join(lines) + "\n"

    def save(self, json_path: str, md_path: str) -> None:
        write_text(json_path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        write_text(md_path, self.markdown())


# --------------------------------------------------------------------------------------
# tokenizer, heldout split
# --------------------------------------------------------------------------------------


def load_tokenizer(spec: str | None, out_dir: str, eos_token: str | None = None):
    """Copy (or convert) the tokenizer of `spec` into out_dir; return (Tokenizer, eos_id, name).

    spec: a catalogue model or model path (GGUF, Hugging Face folder), a folder holding a
    tokenizer.json, or a tokenizer.json file. None: the catalogue's default model.
    """
    from tokenizers import Tokenizer

    from hanlin.backends.tokenizer import write_tokenizer_files
    from hanlin.catalog import DEFAULT_MODEL, resolve

    spec = spec or DEFAULT_MODEL
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.expanduser(spec)
    if os.path.isfile(path) and path.endswith(".json"):
        shutil.copy2(path, os.path.join(out_dir, "tokenizer.json"))
        if os.path.isfile(cfg := os.path.join(os.path.dirname(path), "tokenizer_config.json")):
            shutil.copy2(cfg, os.path.join(out_dir, "tokenizer_config.json"))
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        write_tokenizer_files(path, out_dir)  # a folder's tokenizer files, copied as they are
    else:
        write_tokenizer_files(resolve(spec).path, out_dir)
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    # a document's literal "<|endoftext|>" (or any special token's text) is text, not a control
    # token: otherwise a web page quoting it would insert a document boundary mid-document
    tok.encode_special_tokens = True
    if eos_token is None:
        eos_token = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None
    if eos_token is None:
        try:
            with open(os.path.join(out_dir, "tokenizer_config.json"), encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            eos_token = eos.get("content") if isinstance(eos, dict) else eos
        except (OSError, ValueError):
            pass
    if eos_token is None:
        raise DataPrepError(f"the tokenizer of {spec} has no <|endoftext|> and no eos_token: name the document "
                            "separator with --eos-token")
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise DataPrepError(f"--eos-token {eos_token!r} is not a token of the tokenizer of {spec}")
    return tok, eos_id, spec


def split_of(text: str, heldout: float) -> str:
    """'heldout' for a fixed fraction of documents chosen by the hash of their text, else 'train'."""
    if heldout <= 0.0:
        return "train"
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h / 2**64 < heldout else "train"


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------


def _timed(it: Iterable[RawDoc], seconds: dict[str, float]) -> Iterator[RawDoc]:
    """Counts the time spent reading into seconds['read'] (reading runs lazily, pulled by the map)."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            doc = next(it)
        except StopIteration:
            seconds["read"] = seconds.get("read", 0.0) + time.perf_counter() - t0
            return
        seconds["read"] = seconds.get("read", 0.0) + time.perf_counter() - t0
        yield doc


def prepare(inputs: Sequence[str] | str, out: str, *, tokenizer: str | None = None, workers: int | None = None,
            executor: str = "local", ray_address: str | None = None, heldout: float = 0.0,
            langs: Sequence[str] | str | None = None, text_field: str = "text", near_dup_threshold: float = 0.8,
            eos_token: str | None = None, force: bool = False, filters: FilterConfig | None = None,
            tokens_per_shard: int | None = None, log: Callable[[str], None] | None = None) -> Report:
    """Raw documents (files or folders of .txt .md .jsonl[.gz] .html) -> token shards in `out`.

    Returns the Report (also saved as out/report.json and out/report.md). Raises DataPrepError
    for bad input (missing path, existing `out` without force, bad option) and NoDocumentsError
    when nothing survives the filters.
    """
    from hanlin.data.dedup import Deduper
    from hanlin.train.shards import TOKENS_PER_SHARD, ShardWriter, write_manifest

    say = log or (lambda line: None)
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:
        raise DataPrepError("no inputs given: name files or folders of raw text")
    if executor not in ("local", "ray"):
        raise DataPrepError(f"executor {executor!r} is not one of: local, ray")
    if not 0.0 <= heldout < 1.0:
        raise DataPrepError(f"heldout fraction {heldout} is outside [0, 1)")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise DataPrepError(f"workers {workers} must be at least 1")
    cfg = filters or FilterConfig()
    if isinstance(langs, str):
        langs = [x for x in langs.split(",") if x.strip()]
    if langs:
        cfg.langs = tuple(x.strip() for x in langs)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not force:
        raise DataPrepError(f"output {out} already exists: choose another OUT or pass --force to replace it")
    files, skipped = list_files(inputs)  # a missing input is an error before any work
    if not files:
        raise DataPrepError(f"no readable files in {', '.join(inputs)} (looked for .txt .md .jsonl .jsonl.gz .html .htm)")
    deduper = Deduper(near_dup_threshold)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    report = Report(inputs=list(inputs), out=out, files=len(files), skipped_files=skipped, executor=executor, workers=workers,
                    config={**asdict(cfg), "near_dup_threshold": near_dup_threshold, "heldout": heldout, "text_field": text_field})
    try:
        tok, eos_id, tok_name = load_tokenizer(tokenizer, os.path.join(tmp, TOKENIZER_DIR), eos_token)
        report.tokenizer, report.eos_id = tok_name, eos_id
        vocab = tok.get_vocab_size()
        split_names = ("train", "heldout") if heldout > 0 else ("train",)
        writers = {s: ShardWriter(tmp, s, vocab_size=vocab, eos_id=eos_id, tokens_per_shard=tokens_per_shard or TOKENS_PER_SHARD)
                   for s in split_names}  # fmt: skip
        say(f"{len(files)} files ({len(skipped)} skipped), executor {executor}, {workers} workers, tokenizer {tok_name}")
        _run(files, text_field, cfg, executor, workers, ray_address, deduper, tok, writers, heldout, report, say)
        records = {s: w.close() for s, w in writers.items()}
        report.splits = {s: {"docs": sum(r.docs for r in recs), "tokens": sum(r.tokens for r in recs)} for s, recs in records.items()}
        report.check_accounting()
        if report.kept == 0:
            report.save(out + ".report.json", out + ".report.md")
            counts = ", ".join(f"{r} {report.dropped[r]}" for r in report.rules_in_order())
            raise NoDocumentsError(f"no documents survived the filters ({report.documents} read: {counts}); nothing was "
                                   f"written to {out}; the report is {out}.report.md", report)  # fmt: skip
        write_manifest(tmp, records, vocab_size=vocab, eos_id=eos_id, tokenizer=f"{TOKENIZER_DIR}/tokenizer.json",
                       extra={"created_by": "hanlin data prepare", "documents_read": report.documents, "report": "report.json"})
        report.save(os.path.join(tmp, "report.json"), os.path.join(tmp, "report.md"))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _run(files, text_field, cfg, executor, workers, ray_address, deduper, tok, writers, heldout, report: Report, say) -> None:
    seconds: dict[str, float] = {}
    raws = _timed(read_documents(files, text_field=text_field), seconds)
    if executor == "ray":
        from hanlin.data.ray_exec import map_ray

        results = map_ray(raws, cfg, workers, ray_address)
    else:
        results = map_local(raws, cfg, workers)
    pending: list[tuple[str, str]] = []  # (split, text) of kept documents not yet tokenized

    def flush() -> None:
        t0 = time.perf_counter()
        encs = tok.encode_batch([text for _, text in pending], add_special_tokens=False)
        t1 = time.perf_counter()
        for (split, _), enc in zip(pending, encs):
            writers[split].add(enc.ids)
        seconds["tokenize"] = seconds.get("tokenize", 0.0) + t1 - t0
        seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - t1
        pending.clear()

    try:
        _consume(results, deduper, pending, flush, heldout, seconds, report, say)
    finally:
        results.close()  # a stopped run (error, Ctrl-C) ends the pool or Ray job now, not at garbage collection
    report.seconds = {k: round(v, 4) for k, v in seconds.items()}
    say(f"{report.documents} read, {report.kept} kept in {report.wall_seconds:.1f} s")


def _consume(results, deduper, pending, flush, heldout, seconds, report: Report, say) -> None:
    start = last = time.perf_counter()
    for p in results:
        report.documents += 1
        for k, v in p.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        if p.rule is not None:
            report.drop(p.rule, p)
        else:
            t0 = time.perf_counter()
            rule, other = deduper.check(p.index, p.key, p.sig)
            seconds["dedup"] = seconds.get("dedup", 0.0) + time.perf_counter() - t0
            if rule is not None:
                report.drop(rule, p, duplicate_of=f"document {other}")
            else:
                report.kept += 1
                report.languages[p.lang or "un"] = report.languages.get(p.lang or "un", 0) + 1
                pending.append((split_of(p.text, heldout), p.text))
                if len(pending) >= ENCODE_BATCH:
                    flush()
        now = time.perf_counter()
        if now - last >= 2.0:
            last = now
            say(f"{report.documents} read, {report.kept} kept, {report.documents / (now - start):.0f} docs/s")
    if pending:
        flush()
    report.wall_seconds = time.perf_counter() - start
    report.docs_per_s = report.documents / report.wall_seconds if report.wall_seconds > 0 else 0.0


def _move_into_place(tmp: str, out: str) -> None:
    """Rename tmp to out; an existing out (force) is renamed aside first and removed after."""
    old = None
    if os.path.exists(out):
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def main_log(line: str) -> None:
    print(f"data prepare: {line}", file=sys.stderr, flush=True)
