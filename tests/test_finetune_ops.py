"""The trainer's numeric parts on small tensors: the lm_head log-prob op against autograd, the
dtype a run picks, and the adapters' dtype on a bfloat16 base."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hanlin.finetune import FinetuneConfig  # noqa: E402
from hanlin.finetune.plan import training_dtype  # noqa: E402


def reference_logprob(h, weight, targets):
    return torch.log_softmax((h @ weight.t()).float(), dim=-1).gather(1, targets[:, None])[:, 0]


def test_linear_logprob_matches_autograd_values_and_gradients():
    from hanlin.backends.torch.losses import linear_logprob

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (7,), generator=g)
    y[3] = y[4]  # a repeated target must not confuse the scatter
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    got = linear_logprob(h, w, y)
    got.backward(upstream)
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = reference_logprob(h, w, y)
    want.double().backward(upstream)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)  # the forward is float32
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_linear_logprob_in_bfloat16_follows_the_float32_result():
    from hanlin.backends.torch.losses import linear_logprob

    g = torch.Generator().manual_seed(1)
    h32 = torch.randn(64, 32, generator=g)
    w32 = torch.randn(300, 32, generator=g) * 0.3
    y = torch.randint(0, 300, (64,), generator=g)
    h = h32.bfloat16().requires_grad_()
    got = linear_logprob(h, w32.bfloat16(), y)
    assert got.dtype == torch.float32
    got.sum().backward()
    href = h32.clone().requires_grad_()
    want = reference_logprob(href, w32, y)
    want.sum().backward()
    assert (got - want).abs().max() < 0.15  # bfloat16 inputs: 8 bits of mantissa
    cos = torch.nn.functional.cosine_similarity(h.grad.float().ravel(), href.grad.ravel(), dim=0)
    assert cos > 0.99


def test_no_gradient_is_computed_for_a_frozen_weight():
    from hanlin.backends.torch.losses import LinearLogProb

    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(9, 4)  # frozen: LoRA's lm_head
    seen = {}

    class Spy(LinearLogProb):
        @staticmethod
        def backward(ctx, grad):
            seen["needs"] = ctx.needs_input_grad
            return LinearLogProb.backward(ctx, grad)

    Spy.apply(h, w, torch.tensor([1, 2, 3])).sum().backward()
    assert seen["needs"][:2] == (True, False) and w.grad is None and h.grad is not None


@pytest.mark.parametrize(
    "requested,method,kind,dtypes,want",
    [
        ("auto", "lora", "cpu", ("float32", "bfloat16"), "bfloat16"),  # AVX512-BF16 / AMX / ARM BF16
        ("auto", "qlora", "cpu", ("float32", "bfloat16"), "bfloat16"),
        ("auto", "dpo", "cpu", ("float32", "bfloat16"), "bfloat16"),
        ("auto", "full", "cpu", ("float32", "bfloat16"), "float32"),  # the updated weights stay float32
        ("auto", "lora", "cpu", ("float32",), "float32"),  # no native bfloat16
        ("auto", "full", "cuda", ("float32", "bfloat16", "float16"), "bfloat16"),
        ("float32", "lora", "cpu", ("float32", "bfloat16"), "float32"),  # asked for: kept
    ],
)
def test_training_dtype(requested, method, kind, dtypes, want):
    assert training_dtype(requested, method, kind, dtypes) == want


def test_adapters_are_float32_on_a_bfloat16_base():
    from hanlin.backends.torch.model import ModelConfig, Transformer
    from hanlin.finetune.trainer import add_lora

    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)).to(torch.bfloat16)
    add_lora(m, FinetuneConfig(model="-", data="-", out="-", method="lora", lora_targets=("q_proj", "v_proj")))
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(p.dtype == torch.bfloat16 for n, p in m.named_parameters() if not p.requires_grad)
    ids = torch.randint(0, 64, (2, 8))
    out = m(ids, positions=torch.arange(8).expand(2, 8), mask=None, hidden_only=True)
    assert out.dtype == torch.bfloat16  # peft casts the adapter's sum back to the base's dtype
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


# --------------------------------------------------------------------------------------
# the allocator `hanlin finetune` runs under (sdk/finetune/allocator.py)
# --------------------------------------------------------------------------------------

WHICH = "from hanlin.finetune.allocator import active; print(active())"


def _run(env):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", WHICH], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_child_env_starts_a_process_under_the_chosen_allocator():
    from hanlin.finetune import allocator

    lib = allocator.mimalloc_library()
    assert lib and lib.endswith("libmimalloc.so"), "cmeel-mimalloc is in the dev and train extras"
    assert allocator.resolve("auto") == "mimalloc"
    under = allocator.child_env("mimalloc")
    assert _run(under) == "mimalloc"
    assert _run(allocator.child_env("glibc", under)) == "glibc"  # taken out of LD_PRELOAD again
    assert under[allocator.ENV] == "mimalloc"


def test_a_bad_allocator_is_named(monkeypatch):
    from hanlin.backends.base import ConfigError
    from hanlin.finetune import allocator

    with pytest.raises(ConfigError, match="'tcmalloc' is not valid: choose one of auto, mimalloc, glibc"):
        allocator.resolve("tcmalloc")
    monkeypatch.setenv(allocator.ENV, "glibc")
    assert allocator.resolve(None) == "glibc"
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    with pytest.raises(ConfigError, match="cmeel-mimalloc package is not installed"):
        allocator.resolve("mimalloc")


def test_reexec_replaces_the_process_once(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "twice.py"
    script.write_text("import os, sys\nprint('start', flush=True)\n"
                      "from hanlin.finetune import allocator\nallocator.reexec_if_needed(sys.argv[1])\n"
                      "print(allocator.active(), os.getpid())\n")  # fmt: skip
    for choice, want in (("mimalloc", "mimalloc"), ("glibc", "glibc")):
        p = subprocess.run([sys.executable, str(script), choice], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.split("\n")
        starts = 2 if choice == "mimalloc" else 1  # the script ran again under mimalloc, once
        assert lines.count("start") == starts, p.stdout
        assert lines[starts].split()[0] == want


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_keeps_8bit_state_and_descends_on_the_cpu(name):
    pytest.importorskip("bitsandbytes")
    from hanlin.finetune.trainer import make_optimizer

    g = torch.Generator().manual_seed(0)
    target = torch.randn(64, 128, generator=g)
    w = torch.nn.Parameter(torch.zeros(64, 128))  # 8192 elements: above bitsandbytes' 4096 minimum for 8-bit state
    opt = make_optimizer([w], FinetuneConfig(model="-", data="-", out="-", optimizer=name), 1e-2, "cpu")
    losses = []
    for _ in range(30):
        loss = ((w - target) ** 2).mean()
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = opt.state[w]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8  # 1 byte per moment, not 4
    assert losses[-1] < 0.75 * losses[0], losses
