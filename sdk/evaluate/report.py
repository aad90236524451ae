"""Reports: the results table, results.json and results.md, `eval compare`, the needle heatmap."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from hanlin.backends.base import ConfigError


def rows_of(results: dict[str, Any]) -> list[tuple[str, str, float, int, float]]:
    """(task, metric, score, n, seconds) per metric of every task."""
    out = []
    for t in results["tasks"]:
        for metric, score in t["metrics"].items():
            out.append((t["task"], metric, score, t["n"], t["seconds"]))
    return out


def table(results: dict[str, Any]) -> str:
    rows = [("task", "metric", "score", "n", "time (s)")] + [(a, b, f"{c:.2f}", str(d), f"{e:.1f}") for a, b, c, d, e in rows_of(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m = results["model"]
    out = [f"# hanlin eval: {m['name']}", "",
           f"engine `{m.get('engine')}`, device `{m.get('device', '-')}`, chat template {'on' if m.get('chat_template') else 'off'}, "
           f"started {results['started']}, {results['seconds']:.1f} s", "",
           "| task | metric | score | n | time (s) |", "|---|---|---:|---:|---:|"]  # fmt: skip
    out += [f"| {a} | {b} | {c:.2f} | {d} | {e:.1f} |" for a, b, c, d, e in rows_of(results)]
    for t in results["tasks"]:
        extra = []
        if t["bad_row_count"]:
            extra.append(f"- {t['bad_row_count']} malformed row(s) skipped: " + "; ".join(t["bad_rows"][:5]))
        extra += [f"- {n}" for n in t["notes"]]
        extra += [f"- {k}: `{v}`" for k, v in t["artifacts"].items()]
        if extra:
            out += ["", f"**{t['task']}**", *extra]
    return "\n".join(out) + "\n"


def write(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    for kind, path in paths.items():
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(results, indent=2, ensure_ascii=False) if kind == "json" else markdown(results))
        os.replace(tmp, path)
    return paths


def load_run(path: str) -> dict[str, Any]:
    f = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no results.json there (give an eval output folder or its results.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    if "tasks" not in data or "model" not in data:
        raise ConfigError(f"{f} is not a hanlin eval results file (no 'tasks'/'model')")
    return data


def compare(runs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """One table with a column per run: (task, metric) rows, scores side by side."""
    if len(runs) < 2:
        raise ConfigError("eval compare needs at least two runs")
    loaded = [load_run(r) for r in runs]
    labels = [f"{d['model']['name']} ({d['model'].get('engine')})" for d in loaded]
    keys: list[tuple[str, str]] = []
    values: dict[tuple[str, str], list[str]] = {}
    for i, d in enumerate(loaded):
        for task, metric, score, _, _ in rows_of(d):
            k = (task, metric)
            if k not in values:
                keys.append(k)
                values[k] = ["-"] * len(loaded)
            values[k][i] = f"{score:.2f}"
    head = ["task", "metric", *labels]
    rows = [head] + [[t, m, *values[(t, m)]] for t, m in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    data = {"runs": [{"path": p, "label": lab} for p, lab in zip(runs, labels)],
            "rows": [{"task": t, "metric": m, "scores": values[(t, m)]} for t, m in keys]}  # fmt: skip
    return "\n".join(lines), data


def needle_heatmap(path: str, lengths: list[int], depths: list[int], found: list[bool], *, title: str) -> str | None:
    """A depth x length grid, green where the needle was found; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    grid = [[0.0] * len(lengths) for _ in depths]
    k = 0
    for j in range(len(lengths)):
        for i in range(len(depths)):
            grid[i][j] = 1.0 if found[k] else 0.0
            k += 1
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
