"""`hanlin eval`: an OpenCompass-style harness over every engine and any OpenAI-compatible URL.

    from hanlin.evaluate import evaluate
    results = evaluate("smollm2-135m-instruct", tasks=["gsm8k", "cmmlu"], limit=20, out_dir="runs/smol")

Tasks are TOML specs (spec.py, tasks/*.toml); rows come from a data directory (data.py);
every model answer goes through one cached path (runner.Harness.answers), so a run that is
interrupted resumes where it stopped; the scoring modes are in runner.py; reports in report.py;
code runs in sandbox.py. docs/eval.md has the agreement with lm-evaluation-harness.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from typing import Any, Sequence

from hanlin.backends.base import ConfigError

from .data import default_data_dir
from .report import compare, table, write
from .runner import Harness, Progress, TaskResult
from .spec import TaskSpec, builtin_tasks, load_spec

__all__ = ["evaluate", "open_model", "compare", "table", "builtin_tasks", "load_spec", "TaskSpec", "TaskResult", "Harness", "default_data_dir"]


def open_model(model: str | Any, *, engine: str = "auto", device: str = "auto", chat_template: bool = False,
               batch_size: int = 8, api_key: str | None = None, model_name: str | None = None, **load_options: Any):  # fmt: skip
    """The harness's view of a model: a loaded LLM, a model name/path (loaded here), or an
    http(s):// URL of an OpenAI-compatible server."""
    from .models import EngineModel, OpenAIModel

    if isinstance(model, str) and model.startswith(("http://", "https://")):
        return OpenAIModel(model, model=model_name, api_key=api_key or os.environ.get("OPENAI_API_KEY"), chat_template=chat_template)
    if isinstance(model, str):
        import hanlin

        model = hanlin.load(model, device=device, engine=engine, pull_missing=True, **load_options)
    return EngineModel(model, chat_template=chat_template, batch_size=batch_size)


def evaluate(model: str | Any, tasks: Sequence[str | TaskSpec], *, out_dir: str | None = None, data_dir: str | None = None,
             limit: int | None = None, shots: int | None = None, batch_size: int = 8, fresh: bool = False,
             progress: Progress | None = None, **model_options: Any) -> dict[str, Any]:  # fmt: skip
    """Run tasks on a model; returns the results (and writes results.json/.md, the samples and
    the answer cache under out_dir when given). A model from open_model() is used as is."""
    if not tasks:
        raise ConfigError("no tasks given: choose from " + ", ".join(builtin_tasks()))
    specs = [t if isinstance(t, TaskSpec) else load_spec(t) for t in tasks]  # unknown tasks fail before any loading
    data_dir = data_dir or default_data_dir()
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir} is not a directory")
    if out_dir and fresh and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    m = model if hasattr(model, "identity") else open_model(model, batch_size=batch_size, **model_options)
    h = Harness(m, data_dir=data_dir, out_dir=out_dir, limit=limit, shots=shots, batch_size=batch_size, progress=progress)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        done = [h.run(s).to_dict() for s in specs]
    finally:
        h.cache.close()
    results = {"model": {"name": m.name, **m.identity}, "started": started, "seconds": round(time.perf_counter() - t0, 2),
               "settings": {"limit": limit, "shots": shots, "data_dir": data_dir, "batch_size": batch_size},
               "tasks": done}  # fmt: skip
    if out_dir:
        results["files"] = write(results, out_dir)
    return results
