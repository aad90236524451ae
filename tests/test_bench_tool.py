"""The decode benchmark runs and reports both sides of its comparison (its figures are read
by people, not asserted: speed claims live in the benchmark, not in timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_prints_json_with_baseline(default_model_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_decode.py"), "--model", default_model_path, "--tokens", "16", "--runs", "1", "--rows", "torch_float32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    sdk = data["sdk_overhead"]
    assert sdk["hanlin_tok_s"] > 0 and sdk["raw_llama_cpp_tok_s"] > 0
    assert abs(sdk["ratio"] - sdk["hanlin_tok_s"] / sdk["raw_llama_cpp_tok_s"]) < 1e-3
    assert sdk["same_tokens"] is True  # both sides decoded the same greedy tokens
    assert sdk["generated_tokens"] == 16
    row = data["rows"]["torch_float32"]
    assert row["tok_s"] > 0 and row["peak_rss_mb"] > 100 and row["generated_tokens"] == 16


def test_bench_decode_small_pages_needs_its_folder_row():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_decode.py"), "--rows", "none", "--small-pages", "onnx_int4"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--small-pages onnx_int4: no --folder onnx_int4=PATH row" in out.stderr, out.stderr
