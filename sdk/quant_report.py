"""What quantization costs: every format and weight type of one model, measured here.

    hanlin quant-report smollm2-135m-instruct [--formats gguf,onnx,openvino] [--quants Q8_0,int4]
    report = hanlin.quant_report.quant_report(Settings(model="smollm2-135m-instruct"))

One row per variant: the float reference, the model file as it is (when it is a GGUF), and
every export `hanlin.export` can write here (GGUF F16/Q8_0/Q5_K_M/Q4_K_M/Q4_0, ONNX
fp32/int8/int4, OpenVINO f32/int8/int4). Columns: file size, perplexity on WikiText-2
(llama.cpp's method: chunks of --ctx tokens, the second half of each scored), its change
against the float model, mean KL divergence and top-1 agreement against the float model at
every scored position, greedy decode tokens/s and peak RSS.

How, and why so:
- The float reference is hanlin's torch engine in float32 on the model (DESIGN.md: "a new
  quantization comes with its perplexity and KL divergence against the float model"). Its
  logits at the scored positions are computed once and written to a memory-mapped float32
  file, so every variant is compared against the very same numbers. Raw float32 logits, not
  float16 log-probs: the comparison is then exact (the reference compared with itself shows
  KL 0 and top-1 100% exactly). The price is the file's size, 4 bytes x vocabulary per scored
  position: 768 MiB for the default 8192 tokens (4096 scored), read one chunk at a time.
  float16 log-probs would halve it; on one chunk of the default model they moved the Q8_0
  export's mean KL by 0.025% and no top-1 decision, so float16 is the way out if disk is short.
- Each variant (export, then measurement) runs in a child process of its own
  (`python -m hanlin.quant_report JOB`): its peak RSS is then its own, and an exporter that
  is missing or crashes costs one row ("unavailable: ..." / "failed: ..."), not the report.
- A child loads its variant with `hanlin.load(path)` (automatic engine choice, as a user
  would) and compares `engine.logits()` with the reference through backends/cpu/stats.py
  (numba kernel, numpy fallback). An engine without logits() still gets perplexity and top-1
  from score_tokens; its KL is n/a.
- Peak RSS is taken after load and decode, before the comparison: it is what running the
  variant costs, not what the report's bookkeeping costs (that peak is in the JSON apart).
- Decode speed: greedy, repeat_penalty 1.0, up to --decode-tokens after a fixed chat prompt,
  timed from the first generated token to the last (tools/bench_decode.py's measure),
  median of --runs, with the number of tokens actually generated.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from hanlin.backends.base import ConfigError, HanlinError
from hanlin.export import FORMATS, QUANTS

__all__ = ["Settings", "quant_report", "format_table", "REPORT_QUANTS"]

# the same prompt as tools/bench_decode.py, so the decode figures can be compared
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the sea, the town and the people."
PROMPT_ROOM = 128  # tokens of context kept for the chat prompt on top of --decode-tokens

# what the report exports by default, per format (GGUF also takes any other llama.cpp type)
REPORT_QUANTS = {
    "gguf": ("F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"),
    "onnx": tuple(QUANTS["onnx"]),
    "openvino": tuple(QUANTS["openvino"]),
}
# an export or a load that raises one of these is "unavailable" (not built yet, not installed,
# refused); anything else is "failed" (a bug to look at). ModuleNotFoundError is an ImportError.
UNAVAILABLE = (HanlinError, ImportError)
CHILD_TIMEOUT_S = 1800
WIKITEXT = os.path.join("..", "shared", "datasets", "wikitext2", "test.txt")


@dataclass(frozen=True)
class Settings:
    model: str
    formats: tuple[str, ...] = FORMATS
    quants: tuple[str, ...] | None = None  # None: REPORT_QUANTS of each format
    tokens: int = 8192  # WikiText-2 tokens used (only the second half of each chunk is scored)
    ctx: int = 512
    decode_tokens: int = 128
    runs: int = 2
    threads: int | None = None
    keep: str | None = None  # keep exported files here (and reuse ones already there)
    text: str | None = None  # default: ../shared/datasets/wikitext2/test.txt

    def validate(self) -> None:
        checks = [
            ("tokens", self.tokens, 16), ("ctx", self.ctx, 16), ("decode_tokens", self.decode_tokens, 2), ("runs", self.runs, 1),
        ]  # fmt: skip
        for name, value, low in checks:
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is invalid: it must be an integer >= {low}")
        if self.ctx % 2:
            raise ConfigError(f"--ctx {self.ctx} is invalid: it must be even (the second half of each chunk is scored)")
        if self.tokens < self.ctx:
            raise ConfigError(f"--tokens {self.tokens} is less than one chunk (--ctx {self.ctx})")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads {self.threads!r} is invalid: it must be an integer >= 1")


@dataclass
class Variant:
    """One row to measure: `role` is reference (torch float32 on the model), source (the
    model file as it is) or export (written by hanlin.export)."""

    format: str
    quant: str
    role: str
    path: str | None = None
    engine: str = "auto"
    note: str = ""


# --------------------------------------------------------------------------------------
# the plan: which rows, checked before any work
# --------------------------------------------------------------------------------------


def parse_list(text: str | None) -> tuple[str, ...] | None:
    """'a, b,c' -> ('a', 'b', 'c'); None or '' -> None (the default)."""
    if not text:
        return None
    return tuple(x.strip() for x in text.split(",") if x.strip()) or None


def check_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    out = tuple(f.lower() for f in formats)
    if not out:
        raise ConfigError(f"no format given: name one or more of {', '.join(FORMATS)}")
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown format(s) {', '.join(bad)}: the report covers {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(out))


def valid_quants(fmt: str) -> tuple[str, ...]:
    """The names --quants accepts for a format: GGUF takes every type the installed llama.cpp
    writes (plus F16/F32), the others their exporter's list."""
    if fmt != "gguf":
        return REPORT_QUANTS[fmt]
    names = [*REPORT_QUANTS["gguf"], *(q for q in QUANTS["gguf"] if q != "...")]
    try:
        from hanlin.backends.gguf.quantize import quant_types

        names += list(quant_types())
    except ImportError:  # no llama.cpp: the GGUF rows say so when they run
        pass
    return tuple(dict.fromkeys(names))


def pick_quants(formats: tuple[str, ...], quants: tuple[str, ...] | None) -> dict[str, list[str]]:
    """format -> the quants to export, in the order given; an unknown name is a ConfigError
    listing what each format takes."""
    if quants is None:
        return {f: list(REPORT_QUANTS[f]) for f in formats}
    valid = {f: {q.lower(): q for q in valid_quants(f)} for f in formats}
    chosen: dict[str, list[str]] = {f: [] for f in formats}
    unknown = []
    for q in quants:
        hits = [f for f in formats if q.lower() in valid[f]]
        if not hits:
            unknown.append(q)
        for f in hits:
            if valid[f][q.lower()] not in chosen[f]:
                chosen[f].append(valid[f][q.lower()])
    if unknown:
        takes = "; ".join(f"{f} takes {', '.join(valid_quants(f))}" for f in formats)
        raise ConfigError(f"unknown quant(s) {', '.join(unknown)} for format(s) {', '.join(formats)}: {takes}")
    return chosen


def plan(settings: Settings, src: Any, export_dir: str) -> list[Variant]:
    """The rows: the float reference, the model file itself when it is a GGUF, then exports."""
    formats = check_formats(settings.formats)
    chosen = pick_quants(formats, settings.quants)
    rows = [Variant("float", "F32", "reference", src.path, engine="torch")]
    if "gguf" in formats and src.format == "gguf":
        rows.append(Variant("gguf", "source", "source", src.path, note="the model file as it is"))
    stem = _stem(src.name)
    for fmt in formats:
        for q in chosen[fmt]:
            name = f"{stem}.{q}.gguf" if fmt == "gguf" else f"{stem}-{fmt}-{q}"
            rows.append(Variant(fmt, q, "export", os.path.join(export_dir, name)))
    return rows


def _stem(name: str) -> str:
    base = os.path.basename(name.rstrip(os.sep))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def find_text(path: str | None) -> str:
    """The evaluation text: --text, or WikiText-2's test split beside the repository (from the
    current directory, then from this checkout)."""
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--text {path} does not exist")
        return os.path.abspath(path)
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.abspath(WIKITEXT), os.path.normpath(os.path.join(here, "..", WIKITEXT))]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise ConfigError(f"WikiText-2 is not at {' or '.join(candidates)}: pass --text FILE (a UTF-8 text)")


# --------------------------------------------------------------------------------------
# the parent: plan, run the children, assemble
# --------------------------------------------------------------------------------------


def quant_report(settings: Settings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every variant; returns the report (rows, reference, settings, machine)."""
    from hanlin.catalog import resolve

    say = log or (lambda _: None)
    settings.validate()
    t0 = time.perf_counter()
    src = resolve(settings.model)  # ModelError when it does not exist, with what would
    text = find_text(settings.text)
    work = tempfile.mkdtemp(prefix="hanlin-quant-report-")
    export_dir = os.path.abspath(settings.keep) if settings.keep else os.path.join(work, "exports")
    os.makedirs(export_dir, exist_ok=True)
    machine = machine_facts()
    try:
        variants = plan(settings, src, export_dir)
        ctx_load = max(settings.ctx, PROMPT_ROOM + settings.decode_tokens)
        common = {"ctx": settings.ctx, "ctx_load": ctx_load, "decode_tokens": settings.decode_tokens, "runs": settings.runs,
                  "threads": settings.threads, "work": work}  # fmt: skip
        rows = []
        for i, v in enumerate(variants, 1):
            fresh = v.role == "export" and not os.path.exists(v.path)
            say(f"[{i}/{len(variants)}] {v.format} {v.quant}: {'exporting, then ' if fresh else ''}measuring")
            job = dict(common, text=text, tokens=settings.tokens) if v.role == "reference" else common
            row = measure(v, job, src.path)
            rows.append(row)
            if v.role == "reference" and row["status"] != "ok":
                raise HanlinError(f"the float reference (torch float32 on {src.path}) could not be measured: {row['reason']}")
            say(f"    {_summary(row)}")
        finish(rows, src)
        reference = reference_facts(rows[0], src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "model": src.name, "model_path": src.path, "reference": reference, "rows": rows,
        "settings": dict(asdict(settings), text=text, ctx_load=ctx_load, formats=list(check_formats(settings.formats))),
        "machine": machine, "columns": COLUMNS, "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def measure(v: Variant, job: dict[str, Any], model_path: str) -> dict[str, Any]:
    """Export (in a child) when the row needs a file, then measure it (in another child)."""
    row = {"format": v.format, "quant": v.quant, "role": v.role, "path": v.path, "note": v.note}
    if v.role == "export":
        if os.path.exists(v.path):
            row["note"] = "exported earlier (--keep), reused"
        else:
            res = run_child({"task": "export", "model": model_path, "out": v.path, "format": v.format, "quant": v.quant}, job["work"])
            if res["status"] != "ok":
                return dict(row, status=res["status"], reason=res["reason"])
            row["export_s"] = res["export_s"]
    res = run_child(dict(job, task="reference" if v.role == "reference" else "variant", role=v.role, path=v.path, engine=v.engine), job["work"])
    row.update(res)
    if res["status"] == "ok":
        row["size_mib"] = round(path_size(v.path) / 2**20, 1) if v.role != "reference" else None
    return row


def run_child(job: dict[str, Any], work: str) -> dict[str, Any]:
    """Run one job in `python -m hanlin.quant_report JOB` and read its result file; a crash or
    a timeout is a 'failed' result with the child's last words."""
    fd, job_path = tempfile.mkstemp(suffix=".json", prefix="job-", dir=work)
    result_path = job_path[: -len(".json")] + ".result.json"
    with os.fdopen(fd, "w") as f:
        json.dump(dict(job, result=result_path), f)
    cmd = [sys.executable, "-m", "hanlin.quant_report", job_path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {CHILD_TIMEOUT_S} s"}
    if os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return {"status": "failed", "reason": f"exit code {proc.returncode}: {lines[-1] if lines else 'no output'}"}


def finish(rows: list[dict[str, Any]], src: Any) -> None:
    """Columns that need the reference: change in perplexity, bits per parameter, precision."""
    ref = rows[0]
    n_params = ref["n_params"] = count_params(src.path, src.format)
    for row in rows:
        if row["status"] != "ok":
            continue
        row["delta_ppl_pct"] = round(100 * (row["perplexity"] / ref["perplexity"] - 1), 3)
        if row["role"] == "reference":
            row["precision"] = "fp32"
        elif n_params and row.get("size_mib") is not None:
            row["bits_per_param"] = round(path_size(row["path"]) * 8 / n_params, 2)
            row["precision"] = f"{row['bits_per_param']:.2f} bpw"


def reference_facts(ref: dict[str, Any], src: Any) -> dict[str, Any]:
    """What the float reference is, in words the table prints under itself."""
    what = f"hanlin torch engine, float32, on {os.path.basename(src.path)}"
    stored = ref.get("source_type")
    if stored and stored not in ("F32", "F16", "BF16"):
        what += f": its {stored} weights dequantized to float32 (the only copy of this model here), not the original float weights"
    return {
        "description": what, "perplexity": ref["perplexity"], "engine": ref["engine"], "n_params": ref.get("n_params"),
        "tokens_scored": ref["tokens_scored"], "chunks": ref["chunks"], "ref_logits_mib": ref["ref_logits_mib"],
        "ref_logits_storage": "float32 raw logits of the scored positions, memory-mapped in a temporary file",
        "stats": ref["stats_impl"],
    }  # fmt: skip


def count_params(path: str, fmt: str) -> int | None:
    """The model's parameter count from its file headers (GGUF tensor table, safetensors
    headers), without loading it: the torch engine's packed CPU weights no longer count as
    parameters, so the loaded model cannot be asked."""
    if fmt == "gguf":
        from hanlin.backends.gguf.gguf_file import read_gguf

        return read_gguf(path).n_params
    if fmt != "hf":
        return None
    import struct

    total = 0
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total or None


def path_size(path: str) -> int:
    """Bytes of a file, or of everything in a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def machine_facts() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from hanlin.devices import get_device

    cpu = get_device("cpu")
    versions = {}
    for dist in ("llama-cpp-python", "torch", "onnxruntime", "openvino", "numba", "numpy"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu.name, "physical_cores": cpu.physical_cores, "logical_cores": cpu.logical_cores,
        "features": list(cpu.features), "memory_gib": round((cpu.memory_total or 0) / 2**30, 1),
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    kl = "n/a" if row.get("kl_mean") is None else _kl(row["kl_mean"])
    return f"{row['engine']}: ppl {row['perplexity']:.3f}, KL {kl}, top-1 {row['top1_pct']:.2f}%, {row['decode_tok_s']} tok/s, {row['peak_rss_mb']} MB"


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------

# table header -> the row's JSON key
COLUMNS = {
    "format": "format", "quant": "quant", "engine": "engine", "precision": "precision", "size MiB": "size_mib",
    "ppl": "perplexity", "Δppl %": "delta_ppl_pct", "mean KL": "kl_mean", "top-1 %": "top1_pct", "tok/s": "decode_tok_s",
    "gen": "generated_tokens", "RSS MB": "peak_rss_mb",
}  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    """Aligned columns, then what the numbers mean."""
    lines = [[*COLUMNS]] + [_cells(row) for row in report["rows"]]
    widths = [max(len(r[i]) for r in lines if i < len(r) and (len(r) == len(COLUMNS) or i < 2)) for i in range(len(COLUMNS))]
    out = []
    for r in lines:  # names left-aligned, numbers right-aligned; a row that did not run: its reason after the quant
        out.append("  ".join(c.ljust(w) if i < 4 or len(r) < len(COLUMNS) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    s, ref = report["settings"], report["reference"]
    out += [
        "",
        f"float reference: {ref['description']}.",
        f"perplexity: {os.path.basename(s['text'])}, first {s['tokens']} tokens, {ref['chunks']} chunks of {s['ctx']}, "
        f"the second half of each scored ({ref['tokens_scored']} tokens); KL and top-1 at the same positions against the float "
        f"reference's logits ({ref['ref_logits_mib']} MiB, float32, memory-mapped).",
        f"decode: greedy, repeat penalty 1.0, up to {s['decode_tokens']} new tokens after a fixed chat prompt ('gen' = generated), "
        f"first to last token, median of {s['runs']}; RSS: peak after load and decode, in the variant's own process.",
        f"stats: {ref['stats']}; machine: {report['machine']['cpu']}, {report['machine']['logical_cores']} cores, "
        f"load average {report['machine']['load_average_start'][0]} at start; wall time {report['wall_s']} s.",
    ]  # fmt: skip
    return "\n".join(out)


def _cells(row: dict[str, Any]) -> list[str]:
    quant = f"{row['quant']} (source)" if row["role"] == "source" else row["quant"]
    if row["status"] != "ok":
        return [row["format"], quant, f"{row['status']}: {row['reason']}"]

    def num(key: str, fmt: str) -> str:
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    kl = "n/a" if row.get("kl_mean") is None else _kl(row["kl_mean"])
    return [row["format"], quant, row["engine"], row.get("precision", "-"), num("size_mib", ".1f"), num("perplexity", ".3f"),
            num("delta_ppl_pct", "+.2f"), kl, num("top1_pct", ".2f"), num("decode_tok_s", ".1f"), num("generated_tokens", "d"),
            num("peak_rss_mb", ".0f")]  # fmt: skip


def _kl(v: float) -> str:
    """0 when exactly 0 (the reference against itself), else readable at any size: a float
    export's 4e-06 must not print as 0.00000."""
    if v == 0:
        return "0"
    return f"{v:.1e}" if abs(v) < 1e-4 else f"{v:.5f}"


# --------------------------------------------------------------------------------------
# the children: one job each, the result written to a file
# --------------------------------------------------------------------------------------


def child_main(job_path: str) -> int:
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    try:
        res = {"export": export_job, "reference": reference_job, "variant": variant_job}[job["task"]](job)
        res["status"] = "ok"
    except UNAVAILABLE as e:
        res = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}" if not isinstance(e, HanlinError) else str(e)}
    except Exception as e:  # a bug in an exporter or an engine: one failed row, with its words
        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    tmp = job["result"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(res, f)
    os.replace(tmp, job["result"])
    return 0


def export_job(job: dict[str, Any]) -> dict[str, Any]:
    from hanlin.export import export

    t0 = time.perf_counter()
    export(job["model"], job["out"], to=job["format"], quant=job["quant"])
    return {"export_s": round(time.perf_counter() - t0, 1)}


def load_variant(job: dict[str, Any]) -> Any:
    import hanlin

    opts: dict[str, Any] = {"ctx_size": job["ctx_load"], "threads": job["threads"]}
    if job["engine"] == "torch":
        opts["dtype"] = "float32"
    llm = hanlin.load(job["path"], device="cpu", engine=job["engine"], **opts)
    if job["threads"] and "torch" in sys.modules:
        import torch

        torch.set_num_threads(job["threads"])
    return llm


def reference_job(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize the text into chunks (every variant scores these ids), measure the float
    model and write its logits at the scored positions for the others to compare with."""
    import numpy as np

    t0 = time.perf_counter()
    llm = load_variant(job)
    load_s = time.perf_counter() - t0
    chunks = make_chunks(llm, job["text"], job["tokens"], job["ctx"])
    np.save(os.path.join(job["work"], "chunks.npy"), chunks)
    out = decode_speed(llm, job["decode_tokens"], job["runs"])
    out["peak_rss_mb"] = peak_rss_mb()
    V = llm.engine.logits([int(x) for x in chunks[0][:2]]).shape[1]  # the vocabulary, as the logits have it
    n_rows = len(chunks) * half(job["ctx"])
    need = n_rows * V * 4
    free = shutil.disk_usage(job["work"]).free
    if need > free * 0.9:
        raise ConfigError(f"the reference logits need {need / 2**30:.1f} GiB in {job['work']}, {free / 2**30:.1f} GiB is free: use fewer --tokens or set TMPDIR")
    ref = np.lib.format.open_memmap(os.path.join(job["work"], "ref.npy"), mode="w+", dtype=np.float32, shape=(n_rows, V))
    out.update(evaluate(llm.engine, chunks, ref, job["ctx"], write=True))
    ref.flush()
    del ref
    out.update(engine=llm.engine.name, load_s=round(load_s, 2), ref_logits_mib=round(need / 2**20, 1), source_type=source_type(job["path"]))
    return out


def variant_job(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    t0 = time.perf_counter()
    llm = load_variant(job)
    load_s = time.perf_counter() - t0
    chunks = np.load(os.path.join(job["work"], "chunks.npy"))
    out = decode_speed(llm, job["decode_tokens"], job["runs"])
    out["peak_rss_mb"] = peak_rss_mb()
    ref = np.load(os.path.join(job["work"], "ref.npy"), mmap_mode="r")
    out.update(evaluate(llm.engine, chunks, ref, job["ctx"]))
    out.update(engine=llm.engine.name, load_s=round(load_s, 2))
    calibration = llm.engine.metadata().get("calibration")
    if calibration:  # GPTQ's calibration text: part of what the row measured
        out["calibration"] = calibration
    if job["role"] == "source":
        out["quant"] = source_type(job["path"]) or "as is"
    return out


def make_chunks(llm: Any, text_path: str, n_tokens: int, ctx: int) -> Any:
    """(n_chunks, ctx) int32 token ids of the text's first n_tokens tokens, BOS first in each
    chunk when the model wants it (llama.cpp's perplexity, base.perplexity)."""
    import numpy as np

    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    ids = llm.tokenize(text[: n_tokens * 12], add_bos=False)  # ~4 characters a token: a prefix is plenty,
    if len(ids) < n_tokens:  # and much faster than the whole 1.3 MB
        ids = llm.tokenize(text, add_bos=False)
    n_chunks = min(n_tokens, len(ids)) // ctx
    if n_chunks == 0:
        raise ConfigError(f"{text_path} is {len(ids)} tokens, less than one chunk of {ctx}")
    chunks = np.asarray(ids[: n_chunks * ctx], dtype=np.int32).reshape(n_chunks, ctx)
    eng = llm.engine
    if eng.add_bos and eng.bos_token_id is not None:
        chunks[:, 0] = eng.bos_token_id
    return chunks


def half(ctx: int) -> int:
    """Scored positions per chunk: targets ctx//2 .. ctx-1."""
    return ctx - ctx // 2


def evaluate(engine: Any, chunks: Any, ref: Any, ctx: int, *, write: bool = False) -> dict[str, Any]:
    """Perplexity, KL and top-1 of `engine` over the chunks against the reference logits `ref`
    ((n_chunks * half(ctx), V), the scored positions only); with write=True this engine is the
    reference and fills `ref` first (so it is compared with exactly what it stored)."""
    import numpy as np

    from hanlin.backends.cpu import stats

    t0 = time.perf_counter()
    first, n = ctx // 2, half(ctx)
    has_logits = callable(getattr(engine, "logits", None))
    kl, agree, lp = [], [], []
    for c, chunk in enumerate(chunks):
        ids = [int(x) for x in chunk]
        targets = np.asarray(ids[first:])
        ref_rows = ref[c * n : (c + 1) * n]  # logits predicting targets
        if has_logits:
            cand = engine.logits(ids)[first - 1 : ctx - 1]
            if write:
                ref_rows[:] = cand
            st = stats.compare(ref_rows, cand, targets)
            kl.append(st.kl)
            agree.append(st.agree)
            lp.append(st.cand_logprob)
        else:  # perplexity and top-1 from score_tokens; KL needs the whole distribution
            sc = engine.score_tokens(ids)
            lp.append(np.asarray(sc.logprobs[first - 1 :]))
            agree.append(np.asarray(sc.argmax[first - 1 :]) == np.asarray(ref_rows).argmax(axis=1))
    lp_all, agree_all = np.concatenate(lp), np.concatenate(agree)
    out = {"perplexity": float(math.exp(-lp_all.mean())), "top1_pct": round(100 * float(agree_all.mean()), 3),
           "tokens_scored": int(lp_all.size), "chunks": int(len(chunks)), "logits": "logits()" if has_logits else "score_tokens()",
           "stats_impl": stats.implementation()}  # fmt: skip
    if kl:
        k = np.concatenate(kl)
        out.update(kl_mean=float(k.mean()), kl_mean_stderr=float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else None,
                   kl_median=float(np.median(k)), kl_p99=float(np.percentile(k, 99)), kl_max=float(k.max()))  # fmt: skip
    else:
        out["kl_mean"] = None
    out["eval_s"] = round(time.perf_counter() - t0, 2)
    out["eval_peak_rss_mb"] = peak_rss_mb()
    return out


def decode_speed(llm: Any, n: int, runs: int) -> dict[str, Any]:
    """Greedy decode of up to n tokens after the fixed chat prompt: tokens/s from the first
    generated token to the last (prefill apart), median of `runs`, after a short warm-up."""
    ids = llm.chat_ids([{"role": "user", "content": PROMPT}])

    def once(max_tokens: int) -> tuple[float | None, int]:
        reset = getattr(llm.engine, "reset", None)
        if reset:
            reset()  # no cached prompt prefix: every run does the same work
        t_first = t_last = None
        count = 0
        for ev in llm.generate_ids(ids, stream=True, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0):
            if ev.token_id is None:
                continue
            t_last = time.perf_counter()
            t_first = t_first or t_last
            count += 1
        rate = (count - 1) / (t_last - t_first) if count > 1 and t_last > t_first else None
        return rate, count

    once(8)
    rates, count = [], 0
    for _ in range(runs):
        rate, count = once(n)
        if rate is not None:
            rates.append(rate)
    return {"decode_tok_s": round(statistics.median(rates), 2) if rates else None, "decode_tok_s_all": [round(r, 2) for r in rates],
            "generated_tokens": count, "prompt_tokens": len(ids)}  # fmt: skip


def source_type(path: str) -> str | None:
    """A GGUF's weight type by llama.cpp's name (Q4_1, F16, ...), from general.file_type."""
    if not path or not os.path.isfile(path):
        return None
    from hanlin.backends.gguf.gguf_file import read_gguf

    ft = read_gguf(path).metadata.get("general.file_type")
    if ft is None:
        return None
    try:
        from hanlin.backends.gguf.quantize import quant_types

        names = {v: k for k, v in quant_types().items()}
    except ImportError:
        return f"file_type {ft}"
    return names.get(ft, f"file_type {ft}")


def peak_rss_mb() -> float:
    from hanlin.devices.tools import peak_rss_bytes

    return round(peak_rss_bytes() / 2**20, 1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hanlin.quant_report JOB.json  (internal: one row of `hanlin quant-report`)")
    sys.exit(child_main(sys.argv[1]))
