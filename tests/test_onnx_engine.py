"""ONNX export and the ONNX Runtime engine: tiny random-weight models against our torch forward
(float32 exactly, every cache path), then the real default model exported through the CLI and
run through the SDK and a real server, with its tokens, scores and greedy text checked against
the torch engine on the same weights."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import hanlin  # noqa: E402
from conftest import eval_against_torch, run_cli  # noqa: E402
from hanlin.backends.base import ConfigError, GenerationConfig, ModelError  # noqa: E402
from hanlin.backends.cpu.onnx_engine import OnnxEngine  # noqa: E402
from hanlin.backends.cpu.onnx_export import (  # noqa: E402
    INT8_IN_INT4,
    _module,
    export_onnx,
    quantize_block_offsets,
    quantize_matmuls,
)
from hanlin.devices import get_device  # noqa: E402
from test_export import IDS, tiny  # noqa: E402

CPU = get_device("cpu")
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS]))[0].numpy()


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2"])
def test_float_graph_equals_torch_on_every_cache_path(tmp_path, default_model_path, arch, tie):
    model = tiny(arch, tie)
    want = torch_logits(model)
    out = export_onnx(model, str(tmp_path / "m"), quant="fp32", tokenizer_from=default_model_path)
    eng = OnnxEngine.load(out, CPU, ctx_size=32)
    g = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    for i in range(model.config.n_layers):  # the cache goes straight into attention: no Concat copies it
        users = [n.op_type for n in g.node if f"past_key.{i}" in n.input or f"past_value.{i}" in n.input]
        assert users == ["GroupQueryAttention"], users
    full = eng.logits(IDS)
    np.testing.assert_allclose(full, want, atol=1e-4, rtol=0)
    # a prefix in one pass, then one token at a time into the shared buffer: the same numbers
    eng.reset()
    steps = [eng._run(IDS[:4], 0)[-1]] + [eng._run([t], 4 + i)[-1] for i, t in enumerate(IDS[4:])]
    np.testing.assert_allclose(np.stack(steps), want[3:], atol=1e-4, rtol=0)
    # a second chunk after a cached prefix (a new chat turn) is causal within itself
    eng.reset()
    eng._run(IDS[:5], 0)
    np.testing.assert_allclose(eng._run(IDS[5:], 5, all_logits=True), want[5:], atol=1e-4, rtol=0)


def test_int4_rtn_keeps_the_sensitive_projections_at_int8(tmp_path, default_model_path):
    model = tiny("llama", True)
    f32 = export_onnx(model, str(tmp_path / "f32"), quant="fp32", tokenizer_from=default_model_path)
    modules = {n.name: _module(n) for n in onnx.load(os.path.join(f32, "model.onnx"), load_external_data=False).graph.node}
    out = export_onnx(model, str(tmp_path / "q4"), quant="int4-rtn", tokenizer_from=default_model_path)
    g = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    assert not [n for n in g.node if n.op_type == "MatMul"], "every projection is quantized, the lm_head too"
    bits = {}
    for n in g.node:
        if n.op_type == "MatMulNBits":  # the quantizer renames node_linear_2 to node_linear_2_Q8
            name = "lm_head" if any("lm_w" in i for i in n.input) else modules[n.name.rsplit("_Q", 1)[0]]
            bits[name] = next(a.i for a in n.attribute if a.name == "bits")
    assert len(bits) == 2 * 7 + 1
    for name, b in bits.items():
        assert b == (8 if name.endswith(INT8_IN_INT4) else 4), (name, b)
    eng = OnnxEngine.load(out, CPU, ctx_size=32)
    assert eng.metadata()["quant"] == "int4-rtn"
    got, want = eng.logits(IDS), torch_logits(model)
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    print(f"int4-rtn llama: logit correlation {corr:.4f}")
    assert corr > 0.85, corr  # quantized (0.93 measured on random weights), but the same model


def snap_to_q4_1(model) -> None:
    """Put every projection's weights on a Q4_1 grid (blocks of 32 along the input: a float
    scale and minimum each), as a model read from a Q4_1 GGUF has them."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                w = m.weight.view(m.weight.shape[0], -1, 32)
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                d = (hi - lo) / 15
                w.copy_(torch.round((w - lo) / d) * d + lo)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2"])
def test_int4_holds_a_q4_1_model_with_fused_projections(tmp_path, default_model_path, arch, tie):
    model = tiny(arch, tie)
    snap_to_q4_1(model)
    out = export_onnx(model, str(tmp_path / "q4"), quant="int4", tokenizer_from=default_model_path)
    g = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    # per layer: q/k/v as one node, o_proj, gate/up as one node, down_proj, each with its
    # offsets as an 8-bit product (K = the input's block count); then the lm_head at int8
    assert bits == [4] * (4 * model.config.n_layers) + [8] * (4 * model.config.n_layers + 1), bits
    offsets = [n for n in nbits if n.name.endswith("_offset")]
    assert len(offsets) == 4 * model.config.n_layers
    assert all(next(a.i for a in n.attribute if a.name == "K") * 32 == next(a.i for a in m.attribute if a.name == "K")
               for n in offsets for m in nbits if m.name == n.name[: -len("_offset")] + "_main")  # fmt: skip
    # gate/up split; q/k/v go to attention packed, their biases (qwen2) summed in before
    assert len([n for n in g.node if n.op_type == "Split"]) == model.config.n_layers
    assert all(list(n.input[1:3]) == ["", ""] for n in g.node if n.op_type == "GroupQueryAttention")
    assert len([n for n in g.node if n.op_type == "Add"]) == (1 if model.config.qkv_bias else 2) * model.config.n_layers
    sums = (3 if model.config.qkv_bias else 2) * model.config.n_layers
    assert len([n for n in g.node if n.op_type == "Sum"]) == sums, "o_proj and down_proj offsets join the residual add"
    eng = OnnxEngine.load(out, CPU, ctx_size=32)
    assert eng.metadata()["quant"] == "int4"
    got, want = eng.logits(IDS), torch_logits(model)
    # the 4-bit codes and scales are held exactly, the offsets to 8 bits; the rest is the kernel's int8
    # activations (and the int8 lm_head)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.995
    rtn = OnnxEngine.load(export_onnx(model, str(tmp_path / "rtn"), quant="int4-rtn", tokenizer_from=default_model_path), CPU, ctx_size=32)
    err, err_rtn = np.abs(got - want).mean(), np.abs(rtn.logits(IDS) - want).mean()
    assert err < 0.5 * err_rtn, (err, err_rtn)  # integer zero points cannot hold the same grid


def test_offsets_int8_round_each_column_to_half_a_step():
    from hanlin.backends.cpu.onnx_export import offsets_int8

    rng = np.random.default_rng(0)
    for G in (18, 32, 48):  # one block padded, one full block, a full one and a padded one
        c = (rng.standard_normal((G, 40)) * rng.uniform(0.01, 10, (1, 40))).astype(np.float32)
        c[:, 7] = 0  # an all-zero column keeps a usable scale
        q, s = offsets_int8(c)
        assert q.shape == (40, -(-G // 32), 32) and s.shape == (40, -(-G // 32)) and q.dtype == np.uint8
        back = ((q.astype(np.float32) - 128) * s[..., None]).reshape(40, -1)[:, :G].T
        step = np.repeat(s, 32, axis=1)[:, :G].T
        assert np.all(np.abs(back - c) <= step / 2 + 1e-7), np.abs(back - c).max()
        assert np.all(q.reshape(40, -1)[:, G:] == 128), "padding holds zeros"
        assert np.all(back[:, 7] == 0)


def test_block_offsets_reproduce_a_q4_1_grid_and_round_a_float_one():
    from hanlin.backends.cpu.onnx_export import _block_offsets

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 64), generator=g)
    q[:, 0::32], q[:, 1::32] = 0, 15
    d, m = torch.rand(8, 2, generator=g) + 0.05, torch.randn(8, 2, generator=g)
    w = (q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)).numpy().astype(np.float32)
    q2, d2, c2 = _block_offsets(w)
    back = d2.repeat(32, 1) * (q2.astype(np.float32) - 8) + c2.repeat(32, 1)
    np.testing.assert_allclose(back, w, atol=1e-5)
    f = torch.randn(8, 64, generator=g).numpy()
    q3, d3, c3 = _block_offsets(f)
    back = d3.repeat(32, 1) * (q3.astype(np.float32) - 8) + c3.repeat(32, 1)
    assert np.abs(back - f).max() <= d3.max() / 2 + 1e-6, "round-to-nearest: at most half a step"


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2"])
def test_int4_gptq_is_4_bits_everywhere_with_integer_zero_points(tmp_path, default_model_path, arch, tie):
    model = tiny(arch, tie)
    text = tmp_path / "calib.txt"
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "wikitext2", "test.txt"), encoding="utf-8") as f:
        text.write_text(f.read()[:30000], encoding="utf-8")  # a fixed text: the README changes with every feature
    out = export_onnx(model, str(tmp_path / "q4"), quant="int4-gptq", tokenizer_from=default_model_path, calibration=str(text))
    g = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    nodes = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * 7 + 1 and not [n for n in g.node if n.op_type == "MatMul"]
    for n in nodes:
        assert next(a.i for a in n.attribute if a.name == "bits") == 4
        assert len(n.input) == 4 and n.input[3].endswith("_zero_points"), "asymmetric: GPTQ's integer zero points"
    eng = OnnxEngine.load(out, CPU, ctx_size=32)
    assert eng.metadata()["quant"] == "int4-gptq" and eng.metadata()["calibration"] == "calib.txt"
    got, want = eng.logits(IDS), torch_logits(model)
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    print(f"int4-rtn llama: logit correlation {corr:.4f}")
    assert corr > 0.85, corr
    torch.testing.assert_close(torch.tensor(torch_logits(model)), torch.tensor(want))  # the model itself is untouched


def test_bad_exports_say_what_is_wrong_and_leave_nothing(tmp_path, default_model_path, monkeypatch):
    model = tiny("llama", True)
    with pytest.raises(ValueError, match="int4"):
        export_onnx(model, str(tmp_path / "x"), quant="int3", tokenizer_from=default_model_path)
    with pytest.raises(ConfigError, match="fp32, int8, int4, int4-gptq, int4-rtn, int4-hqq"):
        hanlin.export(default_model_path, str(tmp_path / "x"), to="onnx", quant="q4_k_m")
    with pytest.raises(ConfigError, match="calibration text is for ONNX int4-gptq"):
        hanlin.export(default_model_path, str(tmp_path / "x"), to="onnx", quant="int8", calibration=__file__)
    with pytest.raises(ConfigError, match="'nope.txt' is not a file"):
        hanlin.export(default_model_path, str(tmp_path / "x"), to="onnx", quant="int4-gptq", calibration="nope.txt")
    with pytest.raises(ConfigError, match="gguf, onnx, openvino"):
        hanlin.export(default_model_path, str(tmp_path / "x"), to="tflite")
    model.config.arch = "mamba"
    with pytest.raises(ValueError, match="mamba"):
        export_onnx(model, str(tmp_path / "x"), quant="fp32", tokenizer_from=default_model_path)
    model.config.arch = "llama"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    import hanlin.backends.cpu.onnx_export as ox

    monkeypatch.setattr(ox, "quantize_matmuls", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, str(tmp_path / "x"), quant="int8", tokenizer_from=default_model_path)
    assert os.listdir(tmp_path) == [], "an interrupted export leaves nothing behind"
    with pytest.raises(ModelError, match="hanlin_onnx.json"):
        OnnxEngine.load(str(tmp_path), CPU)


# --------------------------------------------------------------------------------------
# the real default model, exported once through the CLI
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory, default_model_path):
    out = str(tmp_path_factory.mktemp("onnx") / "smol-fp32")
    r = run_cli("export", default_model_path, out, "--to", "onnx", "--quant", "fp32", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "onnx fp32" in r.stdout
    return out


@pytest.fixture(scope="module")
def onnx_llm(fp32_folder):
    llm = hanlin.load(fp32_folder, ctx_size=1024)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def torch_llm(default_model_path):
    llm = hanlin.load(default_model_path, engine="torch", ctx_size=1024)
    yield llm
    llm.close()


def test_auto_selection_and_metadata(onnx_llm, fp32_folder):
    assert onnx_llm.engine.name == "onnx"
    meta = onnx_llm.engine.metadata()
    assert meta["quant"] == "fp32" and meta["precision"] == "float32" and meta["architecture"] == "llama"
    assert "<|im_start|>" in meta["chat_template"]
    with open(os.path.join(fp32_folder, "hanlin_onnx.json")) as f:
        assert json.load(f)["n_layers"] == 30


def test_weights_on_huge_pages_change_no_number(onnx_llm, fp32_folder, monkeypatch):
    from hanlin.backends.hugepages import unavailable

    monkeypatch.delenv("HANLIN_HUGE_PAGES", raising=False)  # conftest turns it off for the suite
    ids = wikitext_ids(onnx_llm, 64)
    small = OnnxEngine.load(fp32_folder, CPU, ctx_size=128, huge_pages=False)
    assert small.metadata()["huge_pages_note"] == "not asked for" and small.metadata()["huge_pages_mib"] == 0
    want = small.logits(ids)
    small.close()
    big = OnnxEngine.load(fp32_folder, CPU, ctx_size=128)  # the default
    meta = big.metadata()
    if unavailable():
        assert meta["huge_pages_note"] == unavailable()
    else:  # onnxruntime's packed weights moved (measured: 106 MiB of this fp32 model)
        assert meta["huge_pages_mib"] >= 32, meta
        assert "huge_pages_note" not in meta
    np.testing.assert_array_equal(big.logits(ids), want)
    big.close()


def test_tokenizer_ids_equal_llama_cpp(onnx_llm, raw_llama):
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "wikitext2", "test.txt"), encoding="utf-8").read()[:20000]
    text += "<|im_start|>user\nhé 你好 🙂<|im_end|>"
    assert onnx_llm.engine.tokenize(text) == raw_llama.tokenize(text.encode(), add_bos=False, special=True)


def test_scores_and_greedy_chat_equal_the_torch_engine(onnx_llm, torch_llm):
    ids = onnx_llm.tokenize("The tower is 324 metres tall, about the same height as an 81-storey building.")
    a, b = onnx_llm.engine.score_tokens(ids), torch_llm.engine.score_tokens(ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-3)
    assert a.argmax == b.argmax
    cfg = dict(max_tokens=24, temperature=0)
    assert onnx_llm.chat(CHAT, **cfg).text == torch_llm.chat(CHAT, **cfg).text


def test_multi_turn_prefix_reuse_equals_a_fresh_run(onnx_llm):
    eng = onnx_llm.engine
    cfg = GenerationConfig(max_tokens=16, temperature=0, repeat_penalty=1.0)
    first = onnx_llm.tokenize("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    reply = [e.token_id for e in eng.generate(first, cfg) if e.token_id is not None]
    second = first + reply + onnx_llm.tokenize("<|im_end|>\n<|im_start|>user\nAnd goodbye?<|im_end|>\n<|im_start|>assistant\n")
    held = list(eng._tokens)
    reused = [e.token_id for e in eng.generate(second, cfg)]
    assert held and second[: len(held)] == held, "the cache holds the first turn"
    eng.reset()
    fresh = [e.token_id for e in eng.generate(second, cfg)]
    assert reused == fresh


def test_sampling_is_seeded_and_stops_apply(onnx_llm):
    kw = dict(max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, seed=7)
    a, b = onnx_llm.chat(CHAT, **kw), onnx_llm.chat(CHAT, **kw)
    assert a.text == b.text and a.text
    others = {onnx_llm.chat(CHAT, **{**kw, "seed": s}).text for s in (8, 9, 10)}
    assert others - {a.text}, "other seeds draw other texts"
    events = list(onnx_llm.engine.generate(onnx_llm.tokenize("1, 2, 3, 4,"), GenerationConfig(max_tokens=30, temperature=0, stop=(" 7",), logprobs=True)))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop" and " 7" not in text and "6" in text
    assert all(e.logprob is not None and e.logprob <= 0 for e in events if e.token_id is not None)
    with pytest.raises(ConfigError, match="json_schema"):
        list(onnx_llm.engine.generate([1, 2], GenerationConfig(json_schema='{"type": "object"}')))


def wikitext_ids(llm, n: int = 512) -> list[int]:
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "wikitext2", "test.txt"), encoding="utf-8").read()[:6000]
    return llm.tokenize(text)[:n]


def quantized_copy(fp32_folder, folder, quantize) -> OnnxEngine:
    shutil.copytree(fp32_folder, folder)
    quantize(str(folder / "model.onnx"))
    return OnnxEngine.load(str(folder), CPU, ctx_size=1024)


def test_int8_and_int4_stay_close_to_float(onnx_llm, fp32_folder, tmp_path):
    ids = wikitext_ids(onnx_llm)
    ref = onnx_llm.engine.logits(ids)
    # measured top-1 agreement with fp32 on these 512 tokens: int8 0.959, int4 0.967, int4-rtn 0.832
    for quant, bits, min_top1 in (("int8", 8, 0.93), ("int4", 4, 0.94), ("int4-rtn", 4, 0.75)):
        quantize = quantize_block_offsets if quant == "int4" else (lambda p: quantize_matmuls(p, bits=bits))
        eng = quantized_copy(fp32_folder, tmp_path / quant, quantize)
        got = eng.logits(ids)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        assert top1 >= min_top1, (quant, top1)
        assert os.path.getsize(tmp_path / quant / "model.onnx.data") < os.path.getsize(os.path.join(fp32_folder, "model.onnx.data")) * (0.45 if bits == 8 else 0.4)
        eng.close()


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    from hanlin.backends.cpu.sampling import log_softmax

    p, q = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def test_gptq_int4_is_closer_to_float_than_round_to_nearest_in_the_same_layout(onnx_llm, fp32_folder, tmp_path, default_model_path):
    """The real model, every projection and the lm_head at 4 bits, blocks of 32 with integer
    zero points either way: GPTQ (calibrated on 8 x 128 tokens of WikiText-2 away from the
    scored part, as `--calibration FILE` does) against onnxruntime's own round-to-nearest."""
    from hanlin.backends.cpu import gptq
    from hanlin.backends.cpu.onnx_export import _quantize, _save, quantize_gptq
    from hanlin.backends.torch.weights import load_gguf

    ids = wikitext_ids(onnx_llm)
    ref = onnx_llm.engine.logits(ids)

    def rtn(path):
        _save(_quantize(onnx.load(path), 4, accuracy=4, symmetric=False), path)

    model = load_gguf(default_model_path).float().eval()
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "wikitext2", "test.txt"), encoding="utf-8").read()
    tokens = gptq.text_calibration(onnx_llm.tokenize(text[20000:40000]), n_seq=8, seq_len=128, bos=model.config.bos_token_id)
    kl = {}
    for name, quantize in (("rtn", rtn), ("gptq", lambda p: quantize_gptq(p, model, tokens))):
        eng = quantized_copy(fp32_folder, tmp_path / name, quantize)
        kl[name] = mean_kl(ref, eng.logits(ids))
        eng.close()
    # measured: rtn 0.322, gptq 0.101 (this calibration; 0.146 with 8 x 128 self-generated tokens)
    assert kl["gptq"] < 0.6 * kl["rtn"], kl


def test_the_server_runs_the_onnx_folder_unchanged(fp32_folder):
    import httpx
    from test_server import Server

    s = Server("--model", fp32_folder, "--ctx-size", "512")
    try:
        name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": name, "messages": CHAT, "max_tokens": 12, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] <= 12
    finally:
        s.stop()


def test_hanlin_eval_runs_on_the_onnx_engine_as_on_torch(onnx_llm, torch_llm, tmp_path):
    """`hanlin eval` on an ONNX folder: the same CMMLU log-likelihoods and WikiText-2
    perplexity as the native engine (both float32)."""
    assert onnx_llm.engine.name == "onnx"
    ll_diff, ppl_diff = eval_against_torch(onnx_llm, torch_llm, tmp_path)
    assert ll_diff < 2e-3
    assert ppl_diff < 1e-3
