"""The quantization report and what it is built from: engine.logits() (torch and llama.cpp)
against score_tokens, the per-position statistics (numba kernel against the numpy reference,
and both against the textbook formula), and `hanlin quant-report` end to end on the real
default model (GGUF rows only: they need no exporter but llama.cpp's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli

from hanlin.backends.base import ConfigError
from hanlin.backends.cpu import stats

TEXT = "The lighthouse keeper climbed the stairs at dusk, as he had every evening for thirty years. " * 4


# --------------------------------------------------------------------------------------
# statistics: numba == numpy == the formula
# --------------------------------------------------------------------------------------


def textbook(P: np.ndarray, Q: np.ndarray, targets: np.ndarray):
    """KL(p || q) written out the long way, in float64, for finite logits."""
    p = P.astype(np.float64)
    q = Q.astype(np.float64)
    lp = p - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) - p.max(1, keepdims=True)
    lq = q - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) - q.max(1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    rows = np.arange(len(targets))
    return kl, lp[rows, targets], lq[rows, targets]


def random_logits(T: int = 37, V: int = 5000, noise: float = 0.2, seed: int = 0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 8, size=(T, 1))  # flat rows and peaked rows
    P = (rng.standard_normal((T, V)) * scale + rng.uniform(-20, 20, size=(T, 1))).astype(np.float32)
    Q = (P + rng.standard_normal((T, V)) * noise + rng.uniform(-3, 3, size=(T, 1))).astype(np.float32)  # an offset changes nothing
    return P, Q, rng.integers(0, V, T)


IMPLS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(stats.numba_missing() is not None, reason="numba not installed"))]


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_match_the_formula_on_random_logits(impl):
    P, Q, t = random_logits()
    got = stats.compare(P, Q, t, impl=impl)
    kl, lp, lq = textbook(P, Q, t)
    np.testing.assert_allclose(got.kl, kl, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.ref_logprob, lp, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.cand_logprob, lq, rtol=0, atol=1e-9)
    assert (got.agree == (P.argmax(1) == Q.argmax(1))).all()
    assert (got.kl > 0).all() and got.agree.any() and not got.agree.all()


@pytest.mark.skipif(stats.numba_missing() is not None, reason="numba not installed")
@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "parallel"])
def test_numba_and_numpy_agree_to_1e_6(parallel):
    P, Q, t = random_logits(T=64, V=49152, noise=0.05, seed=1)
    a = stats.compare_numba(P, Q, t, kernel=stats.numba_kernel(parallel))
    b = stats.compare_numpy(P, Q, t)
    for f in ("kl", "ref_logprob", "cand_logprob"):
        assert np.abs(getattr(a, f) - getattr(b, f)).max() < 1e-6, f
    assert (a.agree == b.agree).all()
    # float64 input (e.g. already log-softmaxed reference) gives the same numbers
    c = stats.compare_numba(P.astype(np.float64), Q, t)
    assert np.abs(c.kl - b.kl).max() < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_logits_give_kl_exactly_zero(impl):
    P, _, t = random_logits(seed=2)
    got = stats.compare(P, P.copy(), t, impl=impl)
    assert (got.kl == 0).all() and got.agree.all()
    assert (got.ref_logprob == got.cand_logprob).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_logits_are_masked_tokens(impl):
    """-inf = probability 0: it adds nothing where p is 0 (even if q is 0 too), makes KL +inf
    where only q is 0, and a row with no finite logit is NaN (reported, not hidden)."""
    P, Q, t = random_logits(T=4, V=100, seed=3)
    t[:] = 5
    P[0, 50:] = Q[0, 50:] = -np.inf  # masked in both: KL over the first 50 tokens
    P[1, 60:] = -np.inf  # masked in the reference only: still finite
    Q[2, 7] = -np.inf  # the candidate rules out a token the reference allows: infinite
    P[3, :] = -np.inf  # nothing finite
    got = stats.compare(P, Q, t, impl=impl)
    want0, _, _ = textbook(P[:1, :50], Q[:1, :50], t[:1])
    assert got.kl[0] == pytest.approx(want0[0], abs=1e-9)
    assert np.isfinite(got.kl[1]) and got.kl[1] > 0
    assert got.kl[2] == np.inf
    assert np.isnan(got.kl[3])
    other = stats.compare(P, Q, t, impl="numpy")
    np.testing.assert_array_equal(got.kl, other.kl) if impl == "numpy" else np.testing.assert_allclose(got.kl[:3], other.kl[:3], atol=1e-9)


def test_bad_shapes_and_targets_are_named():
    P, Q, t = random_logits(T=3, V=10)
    with pytest.raises(ConfigError, match="one shape"):
        stats.compare(P, Q[:, :5], t)
    with pytest.raises(ConfigError, match="outside the vocabulary of 10"):
        stats.compare(P, Q, np.array([0, 1, 10]))
    with pytest.raises(ConfigError, match="one id per position"):
        stats.compare(P, Q, t[:2])


def test_without_numba_the_numpy_fallback_runs_and_says_so():
    code = ("import sys; sys.modules['numba'] = None\n"  # makes `import numba` raise ImportError, as when it is not installed
            "import numpy as np\nfrom hanlin.backends.cpu import stats\n"
            "P = np.zeros((2, 8), np.float32); r = stats.compare(P, P, np.array([0, 1]))\n"
            "print(stats.implementation()); print(r.kl.tolist())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    line, kl = out.stdout.splitlines()
    assert line.startswith("numpy (numba not installed") and json.loads(kl) == [0.0, 0.0]


# --------------------------------------------------------------------------------------
# engine.logits() against score_tokens
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["gguf", "torch"])
def test_logits_agree_with_score_tokens_and_leave_the_engine_ready(default_model_path, engine):
    pytest.importorskip("torch" if engine == "torch" else "llama_cpp")
    import hanlin
    from hanlin.backends.cpu.sampling import log_softmax

    # one thread, for the reason given in the `report` fixture below
    llm = hanlin.load(default_model_path, device="cpu", engine=engine, ctx_size=256, threads=1)
    threads = None
    if engine == "torch":
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        ids = llm.tokenize(TEXT)[:80]
        prompt = llm.chat_ids([{"role": "user", "content": "Name three colours."}])
        before = llm.generate_ids(prompt, max_tokens=8, temperature=0, repeat_penalty=1.0).token_ids
        L = llm.engine.logits(ids)
        assert L.dtype == np.float32 and L.shape == (len(ids), 49152)
        sc = llm.engine.score_tokens(ids)
        lps = log_softmax(L[:-1])
        np.testing.assert_allclose(lps[np.arange(len(ids) - 1), ids[1:]], sc.logprobs, rtol=0, atol=1e-9)
        assert L[:-1].argmax(axis=1).tolist() == sc.argmax
        # one causal pass: the first rows do not depend on what comes after them
        np.testing.assert_allclose(llm.engine.logits(ids[:20]), L[:20], rtol=0, atol=1e-3)
        after = llm.generate_ids(prompt, max_tokens=8, temperature=0, repeat_penalty=1.0).token_ids
        assert after == before  # ready to generate, from a clean cache
    finally:
        llm.close()
        if threads:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# hanlin quant-report, end to end
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(default_model_path):
    """The real command on the default model: the float reference, the Q4_1 file as it is
    and a Q8_0 export, 1024 WikiText-2 tokens (2 chunks of 512, 512 positions scored).
    One thread: on a machine whose cores are shared, llama.cpp's and torch's spinning worker
    threads slow down several-fold when another process holds a core (measured 0.9 against
    7.5 tokens/s), and the values checked here do not depend on the thread count."""
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    proc = run_cli("quant-report", default_model_path, "--formats", "gguf", "--quants", "Q8_0", "--tokens", "1024",
                   "--decode-tokens", "16", "--runs", "1", "--threads", "1", "--json", timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def rows_by_role(report):
    return {(r["role"], r["quant"]): r for r in report["rows"]}


@pytest.mark.slow
def test_report_rows_have_sane_values(report):
    rows = rows_by_role(report)
    assert [r["role"] for r in report["rows"]] == ["reference", "source", "export"]
    ref, src, q8 = rows[("reference", "F32")], rows[("source", "Q4_1")], rows[("export", "Q8_0")]
    for r in (ref, src, q8):
        assert r["status"] == "ok", r
        assert r["tokens_scored"] == 512 and r["chunks"] == 2
        assert 1 < r["generated_tokens"] <= 16 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 50
    assert 5 < ref["perplexity"] < 50
    assert abs(q8["perplexity"] / ref["perplexity"] - 1) < 0.02 and q8["delta_ppl_pct"] == pytest.approx(100 * (q8["perplexity"] / ref["perplexity"] - 1), abs=1e-3)
    assert 0 < q8["kl_mean"] < 0.02 and q8["top1_pct"] > 90
    assert q8["engine"] == src["engine"] == "gguf" and ref["engine"] == "torch"
    assert 130 < q8["size_mib"] < 145 and 85 < src["size_mib"] < 100
    assert 8 < q8["bits_per_param"] < 9 and q8["precision"].endswith("bpw")


@pytest.mark.slow
def test_source_row_is_closer_to_the_reference_than_its_q8_0_export(report):
    """The float reference is the Q4_1 file's weights dequantized exactly, so llama.cpp on the
    Q4_1 file differs from it only by how llama.cpp computes (8-bit activations, another
    summation order); the Q8_0 export adds a second rounding of every weight on top. Its KL
    is therefore the larger one, though both are small and positive."""
    rows = rows_by_role(report)
    src, q8 = rows[("source", "Q4_1")], rows[("export", "Q8_0")]
    assert 0 < src["kl_mean"] < q8["kl_mean"]
    assert src["top1_pct"] > 90


@pytest.mark.slow
def test_reference_compared_with_itself_is_exact(report):
    ref = report["rows"][0]
    assert ref["kl_mean"] == 0.0 and ref["kl_max"] == 0.0 and ref["top1_pct"] == 100.0 and ref["delta_ppl_pct"] == 0.0
    assert ref["perplexity"] == report["reference"]["perplexity"]
    assert "Q4_1 weights dequantized to float32" in report["reference"]["description"]
    assert report["reference"]["ref_logits_mib"] == pytest.approx(512 * 49152 * 4 / 2**20, abs=0.1)


@pytest.mark.slow
def test_json_has_the_columns_and_the_table_aligns_them(report):
    from hanlin.quant_report import COLUMNS, format_table

    assert report["columns"] == COLUMNS
    for row in report["rows"]:
        missing = [k for k in COLUMNS.values() if k not in row]
        assert not missing, missing
    assert {"settings", "machine", "reference", "wall_s"} <= set(report)
    assert report["settings"]["tokens"] == 1024 and report["machine"]["logical_cores"] >= 1
    table = format_table(report).splitlines()
    header, body = table[0], table[1:4]
    for name in COLUMNS:
        assert name in header
    # every column's right edge (numbers) or left edge (names) is the same on every line
    for name in ("ppl", "mean KL", "RSS MB"):
        end = header.index(name) + len(name)
        assert all(len(line) >= end and line[end - 1] != " " and (len(line) == end or line[end] == " ") for line in body), name
    assert "Q4_1 (source)" in table[2] and "float reference:" in "\n".join(table)


def test_unknown_quant_and_format_and_model_are_named():
    proc = run_cli("quant-report", "--formats", "gguf", "--quants", "Q9_9")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown quant(s) Q9_9" in proc.stderr and "Q8_0" in proc.stderr and "Q4_K_M" in proc.stderr
    proc = run_cli("quant-report", "--formats", "gguf,tflite")
    assert proc.returncode == 2 and "unknown format(s) tflite" in proc.stderr and "gguf, onnx, openvino" in proc.stderr
    proc = run_cli("quant-report", "/no/such/model.gguf")
    assert proc.returncode == 2 and "/no/such/model.gguf does not exist" in proc.stderr
    proc = run_cli("quant-report", "--tokens", "100", "--ctx", "512")
    assert proc.returncode == 2 and "--tokens 100 is less than one chunk" in proc.stderr


def test_an_export_that_cannot_be_made_is_a_row_not_a_crash(tmp_path, default_model_path):
    """The child protocol with a real refusal: hanlin.export says no, the row says why."""
    from hanlin.quant_report import run_child

    res = run_child({"task": "export", "model": default_model_path, "out": str(tmp_path / "x"), "format": "onnx", "quant": "int3"}, str(tmp_path))
    assert res["status"] == "unavailable" and "int3" in res["reason"] and "int4" in res["reason"]
    assert not os.path.exists(tmp_path / "x")
