"""GGUF export: the native engine's weights -> a GGUF that llama.cpp and our loader read back,
then llama.cpp's quantizer. Checked on tiny random-weight models (with the default model's
tokenizer, so llama.cpp accepts the file) against our torch forward, and once end to end on
the default model through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from hanlin.backends.base import ConfigError  # noqa: E402
from hanlin.backends.torch.export_gguf import save_gguf  # noqa: E402
from hanlin.backends.torch.model import ModelConfig, Transformer  # noqa: E402
from hanlin.backends.torch.weights import load_gguf  # noqa: E402

IDS = [1, 504, 3458, 314, 253, 1345, 30, 2, 7000, 49151]


def tiny(arch: str, tie: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                      max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=tie, qkv_bias=arch == "qwen2")  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model


def logits(model: Transformer) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS]))[0].numpy()


def llama_cpp_logits(path: str) -> np.ndarray:
    import llama_cpp

    m = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=os.cpu_count() or 1, logits_all=True, verbose=False)
    try:
        m.eval(IDS)
        return np.asarray(m.scores[: len(IDS)], dtype=np.float32).copy()
    finally:
        m.close()


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False)], ids=["llama-tied", "llama", "qwen2"])
def test_float32_round_trip_is_exact_and_llama_cpp_computes_the_same_model(tmp_path, default_model_path, arch, tie):
    model = tiny(arch, tie)
    out = save_gguf(model, str(tmp_path / "m.gguf"), tokenizer_from=default_model_path, ftype="f32")
    back = load_gguf(out)
    assert back.config.tie_embeddings == tie and back.config.arch == arch
    want = model.state_dict()
    for name, w in back.state_dict().items():
        assert torch.equal(w, want[name]), name
    # llama.cpp reads our layout (q/k permutation, names, metadata) as the same model
    ref, got = logits(model), llama_cpp_logits(out)
    # llama.cpp keeps its KV cache in float16: 0.2% of the logits' range, where a wrong q/k
    # row order or a missing bias is off by tens of percent
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 5e-3 * scale
    assert np.abs(got - ref).mean() < 5e-4 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_float16_round_trip_equals_the_model_with_float16_weights(tmp_path, default_model_path):
    model = tiny("llama", True)
    out = save_gguf(model, str(tmp_path / "m16.gguf"), tokenizer_from=default_model_path, ftype="f16")
    rounded = tiny("llama", True)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2:  # matrices go to float16; norms stay float32, as llama.cpp's converter keeps them
                p.copy_(p.half().float())
    assert np.abs(logits(load_gguf(out)) - logits(rounded)).max() < 1e-3
    assert os.path.getsize(out) < 0.6 * os.path.getsize(save_gguf(model, str(tmp_path / "m32.gguf"), tokenizer_from=default_model_path, ftype="f32"))


def test_the_tokenizer_and_chat_template_travel_with_the_file(tmp_path, default_model_path):
    from gguf import GGUFReader

    out = save_gguf(tiny("llama", True), str(tmp_path / "m.gguf"), tokenizer_from=default_model_path)
    src, ours = GGUFReader(default_model_path), GGUFReader(out)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"):
        assert ours.fields[key].contents() == src.fields[key].contents()
    assert ours.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()
    assert ours.fields["llama.embedding_length"].contents() == 64  # the model's own shape, not the source's 576


def test_llama_cpp_quantizer_output_loads_and_loses_more_with_fewer_bits(tmp_path, default_model_path):
    from gguf import GGMLQuantizationType, GGUFReader

    from hanlin.backends.gguf.quantize import quantize

    f32 = save_gguf(tiny("llama", True), str(tmp_path / "m.gguf"), tokenizer_from=default_model_path, ftype="f32")
    ref = llama_cpp_logits(f32)
    corr = {}
    for qtype in ("Q8_0", "Q4_0"):
        q = quantize(f32, str(tmp_path / f"m.{qtype}.gguf"), qtype)
        types = {t.name: t.tensor_type for t in GGUFReader(q).tensors}
        assert types["blk.0.ffn_down.weight"] == types["blk.1.attn_q.weight"] == GGMLQuantizationType[qtype]
        assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
        corr[qtype] = np.corrcoef(llama_cpp_logits(q).ravel(), ref.ravel())[0, 1]
    # a random-weight model amplifies rounding (measured: 0.998 and 0.886); the quality of
    # real models is the quant report's perplexity and KL
    assert corr["Q8_0"] > 0.99 and 0.5 < corr["Q4_0"] < corr["Q8_0"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hanlin")] == []


def test_bad_input_is_named_and_leaves_nothing_behind(tmp_path, default_model_path):
    import hanlin
    from hanlin.backends.gguf.quantize import quantize

    with pytest.raises(ConfigError, match=r"unknown GGUF quantization 'Q9_9'.*Q4_K_M"):
        hanlin.export(default_model_path, str(tmp_path / "x.gguf"), quant="Q9_9")
    with pytest.raises(ConfigError, match="export format 'tflite' is unknown: hanlin writes gguf, onnx, openvino"):
        hanlin.export(default_model_path, str(tmp_path / "x.tflite"), to="tflite")
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match="could not quantize"):
        quantize(str(bad), str(tmp_path / "out.gguf"), "Q8_0")
    small = tiny("llama", True)
    small.config.vocab_size = 100  # a tokenizer of 49152 tokens cannot describe it
    with pytest.raises(ValueError, match="49152 tokens, the model's embedding 100"):
        save_gguf(small, str(tmp_path / "y.gguf"), tokenizer_from=default_model_path)
    assert sorted(os.listdir(tmp_path)) == ["not-a-model.gguf"]


def test_cli_exports_the_default_model_and_chat_runs_the_file(tmp_path, default_model_path):
    import hanlin

    out = tmp_path / "smol-q8_0.gguf"
    cli = [sys.executable, "-c", "import sys; from hanlin.apps.cli import main; sys.exit(main())"]
    run = subprocess.run([*cli, "export", default_model_path, str(out), "--quant", "q8_0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "Q8_0" in run.stdout and "llama_model" not in run.stdout + run.stderr
    # Q8_0 of the Q4_1 original is the same model to within 8-bit rounding: greedy agrees
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a = hanlin.load(default_model_path, engine="gguf", device="cpu")
    b = hanlin.load(str(out), engine="gguf", device="cpu")
    try:
        want = a.chat(msgs, temperature=0, max_tokens=12, repeat_penalty=1.0).token_ids
        got = b.chat(msgs, temperature=0, max_tokens=12, repeat_penalty=1.0).token_ids
    finally:
        a.close()
        b.close()
    assert got[:6] == want[:6]
