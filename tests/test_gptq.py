"""GPTQ (backends/cpu/gptq.py): the algorithm on layers with known inputs, the whole-model pass
on a tiny random model, and its MatMulNBits packing run by onnxruntime's own kernel."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hanlin.backends.cpu import gptq  # noqa: E402
from test_export import tiny  # noqa: E402


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.2 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix  # inputs whose features move together, as activations do


def output_error(x: torch.Tensor, w: torch.Tensor, ql: gptq.QuantizedLinear) -> float:
    return float((x @ (ql.dequantize() - w).T).pow(2).mean())


def test_gptq_beats_round_to_nearest_on_the_layers_output():
    x = correlated_inputs(4096, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    h = (x.T @ x).double() / len(x)
    rtn = gptq.gptq(w, torch.eye(256, dtype=torch.float64), act_order=False)  # H = I: nothing to compensate with
    plain = gptq.gptq(w, h, act_order=False)
    ordered = gptq.gptq(w, h, act_order=True)
    e_rtn, e_plain, e_ordered = output_error(x, w, rtn), output_error(x, w, plain), output_error(x, w, ordered)
    # measured: round-to-nearest 18.0, GPTQ 10.4, with act_order 9.9
    assert e_plain < 0.7 * e_rtn, (e_plain, e_rtn)
    assert e_ordered < 1.02 * e_plain, (e_ordered, e_plain)
    # the weight error itself grows: GPTQ trades it for the output error
    assert float((plain.dequantize() - w).pow(2).mean()) > float((rtn.dequantize() - w).pow(2).mean())


def test_identity_hessian_is_round_to_nearest_with_the_group_grid():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    ql = gptq.gptq(w, torch.eye(64, dtype=torch.float64), act_order=True)
    assert ql.q.dtype == torch.uint8 and int(ql.q.max()) <= 15 and ql.scale.shape == ql.zero.shape == (8, 2)
    s, z = ql.scale.repeat_interleave(32, 1), ql.zero.float().repeat_interleave(32, 1)
    want = torch.clamp(torch.round(w / s) + z, 0, 15)
    assert torch.equal(ql.q.float(), want)
    # the range search picks, per group, the grid with the least squared error of those it tries
    for g in range(2):
        err = (ql.dequantize()[:, g * 32 : (g + 1) * 32] - w[:, g * 32 : (g + 1) * 32]).pow(2).sum(1)
        lo, hi = w[:, g * 32 : (g + 1) * 32].min(1).values, w[:, g * 32 : (g + 1) * 32].max(1).values
        s_full, z_full = (hi - lo) / 15, torch.round(-lo / ((hi - lo) / 15))
        full = (torch.clamp(torch.round(w[:, g * 32 : (g + 1) * 32] / s_full[:, None]) + z_full[:, None], 0, 15) - z_full[:, None]) * s_full[:, None]
        assert bool((err <= (full - w[:, g * 32 : (g + 1) * 32]).pow(2).sum(1) + 1e-6).all())


def test_a_group_that_is_a_4_bit_grid_already_comes_back_exactly():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (16, 64), generator=g).float()
    q[:, 0::32], q[:, 1::32] = 0, 15  # every group uses the whole range, as a 4-bit block does
    d, m = torch.rand(16, 2, generator=g) + 0.1, -torch.rand(16, 2, generator=g)
    zero = torch.round(-m / d)
    w = (q - zero.repeat_interleave(32, 1)) * d.repeat_interleave(32, 1)
    x = correlated_inputs(512, 64)
    ql = gptq.gptq(w, (x.T @ x).double() / 512)
    torch.testing.assert_close(ql.dequantize(), w, atol=1e-5, rtol=0)


def test_dead_inputs_and_a_width_that_is_not_a_whole_group():
    x = correlated_inputs(1024, 70)
    x[:, 5] = 0  # an input that never fires: its weights do not matter, and H is singular without care
    w = torch.randn(12, 70, generator=torch.Generator().manual_seed(4))
    ql = gptq.gptq(w, (x.T @ x).double() / len(x))
    assert ql.q.shape == (12, 96) and ql.dequantize().shape == (12, 70)
    assert torch.isfinite(ql.dequantize()).all()
    rel = output_error(x, w, ql) / float((x @ w.T).pow(2).mean())
    assert rel < 0.02, rel  # 4 bits keep the output to within a few percent of its energy


def test_the_whole_model_pass_covers_every_linear_and_leaves_the_model_as_it_was():
    model = tiny("llama", True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    tokens = gptq.self_calibration(model, n_seq=3, seq_len=24)
    assert tokens.shape == (3, 24) and tokens[:, 0].tolist() == [1, 1, 1]
    model.config.bos_token_id = None  # Qwen2 has no BOS: its rows start from EOS, the document separator
    assert gptq.self_calibration(model, n_seq=3, seq_len=4)[:, 0].tolist() == [2, 2, 2]
    assert len({tuple(r) for r in tokens[:, 1:].tolist()}) == 3, "each sequence is its own sample"
    log: list[str] = []
    out = gptq.quantize_model(model, tokens, log=log.append)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(out) == linears and "lm_head" in out
    assert log == ["GPTQ: block 1/2", "GPTQ: block 2/2"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was changed"
    for n, ql in out.items():
        w = model.get_submodule(n).weight.detach()
        assert ql.dequantize().shape == w.shape
        # 4-bit steps of these random weights are ~0.1 (error ~0.025 by rounding alone; GPTQ moves more)
        assert float((ql.dequantize() - w).abs().mean()) < 0.2 * float(w.abs().mean()), n


def test_text_calibration_windows_and_a_text_too_short():
    rows = gptq.text_calibration(list(range(100, 1100)), n_seq=4, seq_len=65, bos=1)
    assert rows.shape == (4, 65) and rows[:, 0].tolist() == [1] * 4
    assert rows[0, 1] == 100 and rows[-1, -1] == 1099, "spread from the start of the text to its end"
    with pytest.raises(ValueError, match="30 tokens, less than one window of 64"):
        gptq.text_calibration(list(range(30)), n_seq=4, seq_len=65, bos=1)


def test_packing_runs_in_onnxruntimes_matmulnbits_kernel():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    K, N = 96, 40
    x = correlated_inputs(256, K)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(5))
    ql = gptq.gptq(w, (x.T @ x).double() / len(x))
    b, scales, zeros = gptq.pack_matmulnbits(ql)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(a, n) for a, n in ((b, "B"), (scales, "scales"), (zeros, "zero_points"))])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = x[:8].numpy()
    got = sess.run(None, {"A": a})[0]
    np.testing.assert_allclose(got, a @ ql.dequantize().numpy().T, atol=2e-3, rtol=1e-4)
