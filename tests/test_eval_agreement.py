"""hanlin eval agrees with lm-evaluation-harness: the same model (the default model, via
transformers), the same local files, in one run of tools/eval_agreement.py: the prompts are
identical request by request, and the scores are within 1 point (CMMLU by log-likelihood,
5-shot; GSM8K by generation, 5-shot, flexible and strict extraction). The larger subset's
figures are in docs/eval.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets"))


@pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/datasets is not here")
def test_scores_agree_with_lm_eval_within_one_point(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_agreement.py"), "--cmmlu-subjects", "2", "--cmmlu-limit", "8",
                        "--gsm8k-limit", "2", "--skip-torch", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["cmmlu_questions"] == 16 and rep["hanlin_cmmlu_samples"] == 16
    assert rep["cmmlu_prompt_mismatches"] == 0 and rep["gsm8k_prompt_mismatches"] == 0
    for key in ("cmmlu_acc", "gsm8k_flexible", "gsm8k_strict"):
        assert abs(rep[key]["diff_points"]) <= 1.0, rep
