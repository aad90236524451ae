"""Shared fixtures: the real default model (pulled once if this machine lacks it) and a
loaded GGUF engine, so the slow parts are paid once per test session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
