"""The fine-tuning memory planner: shapes, memory sizes, the activation model checked against
autograd's saved tensors, and the plans and suggestions."""

from __future__ import annotations

import contextlib

import pytest

from hanlin.backends.base import ConfigError
from hanlin.finetune.plan import (
    GiB,
    SIZES,
    Shape,
    activation_bytes,
    parse_memory,
    plan,
    shape_for,
)
from hanlin.finetune import plan as planmod

PARTS = (
    "runtime",
    "weights",
    "adapters",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "transient",
)


# --------------------------------------------------------------------------------------
# measuring what autograd saves (the planner's activation model must agree with this)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _linear_calls_module():
    """Make the model's linear op call the module (so peft's LoRA and bitsandbytes' Linear4bit
    run their own forward), as the trainer does; restore the op table afterwards."""
    from hanlin.backends.torch import model as M

    key = ("linear", "cpu")
    before = M.OPS.get(key)
    M.register_op("linear", "cpu", lambda x, layer: layer(x))
    try:
        yield
    finally:
        if before is None:
            M.OPS.pop(key, None)
        else:
            M.OPS[key] = before


def _build(cfg, method, dtype):
    import torch

    from hanlin.backends.torch.model import Transformer

    torch.manual_seed(0)
    m = Transformer(cfg).to(dtype)
    if method in ("lora", "qlora"):
        m.requires_grad_(False)
    if method == "qlora":
        import bitsandbytes as bnb

        for block in m.layers:
            for parent in (block.self_attn, block.mlp):
                for name, lin in list(parent.named_children()):
                    q = bnb.nn.Linear4bit(
                        lin.in_features,
                        lin.out_features,
                        bias=False,
                        quant_type="nf4",
                        compute_dtype=dtype,
                    )
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data.float().clone(),
                        requires_grad=False,
                        quant_type="nf4",
                    )
                    setattr(parent, name, q.to("cpu"))  # .to() quantizes
                    assert (
                        getattr(parent, name).weight.dtype == torch.uint8
                    )  # really 4-bit
    if method in ("lora", "qlora"):  # the trainer's own adapters: peft's, upcast to float32
        from hanlin.finetune import FinetuneConfig
        from hanlin.finetune.trainer import add_lora

        add_lora(m, FinetuneConfig(model="-", data="-", out="-", method=method, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                   lora_targets=("q_proj", "v_proj")))  # fmt: skip
    return m.train()


def measure_saved(cfg, method, dtype_name, batch, seq) -> int:
    """Bytes of unique non-parameter storages autograd saves in layers + final norm."""
    import torch

    from hanlin.backends.torch.model import rope_cos_sin

    dtype = getattr(torch, dtype_name)
    with _linear_calls_module():
        m = _build(cfg, method, dtype)
        params = {
            t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]
        }
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        mask = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq)
        positions = torch.arange(seq).expand(batch, seq)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = m.embed_tokens(ids)
            cos, sin = rope_cos_sin(m.inv_freq, positions, x.dtype)
            for layer in m.layers:
                x = layer(x, cos, sin, mask)
            h = m.norm(x)
        h.float().sum().backward()  # the graph is real: it runs backward
    return sum(seen.values())


def _tiny(n_layers: int, n_heads: int = 4, n_kv_heads: int = 2):
    from hanlin.backends.torch.model import ModelConfig

    return ModelConfig(
        vocab_size=256,
        dim=128,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=352,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_activation_model_matches_autograd(method, dtype):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    batch, seq = 2, 48
    two, three = (measure_saved(_tiny(n), method, dtype, batch, seq) for n in (2, 3))
    shape = Shape.from_config(_tiny(2))
    # one layer: the difference between a 3-layer and a 2-layer model
    per_layer = (
        batch
        * seq
        * planmod._saved_per_token_layer(
            shape, method, dtype, 8, ("q_proj", "v_proj"), seq, "cpu"
        )
    )
    assert per_layer == pytest.approx(three - two, rel=0.10)
    # everything the forward saves, plus what the trainer adds outside autograd's count: the
    # bool mask (B*T*T) and the selected hidden states (all B*T positions, worst case)
    b = 4 if dtype == "float32" else 2
    extra = batch * seq * seq + batch * seq * shape.dim * b
    predicted = activation_bytes(
        shape,
        method=method,
        seq_len=seq,
        micro_batch=batch,
        grad_checkpoint=False,
        dtype=dtype,
    )
    assert predicted == pytest.approx(two + extra, rel=0.10)


def test_activation_model_would_notice_a_missing_term():
    """The autograd check can fail: drop the MLP's saved tensors and it does."""
    pytest.importorskip("peft")
    batch, seq = 2, 48
    measured = measure_saved(_tiny(3), "lora", "float32", batch, seq) - measure_saved(
        _tiny(2), "lora", "float32", batch, seq
    )
    shape = Shape.from_config(_tiny(2))
    wrong = (
        batch
        * seq
        * (
            planmod._saved_per_token_layer(
                shape, "lora", "float32", 8, ("q_proj", "v_proj"), seq, "cpu"
            )
            - 3 * 4 * shape.hidden_dim
        )
    )
    assert wrong != pytest.approx(measured, rel=0.10)


# --------------------------------------------------------------------------------------
# shapes and sizes
# --------------------------------------------------------------------------------------


def test_known_sizes_have_the_published_parameter_counts():
    assert SIZES["7b"].n_params == pytest.approx(6.74e9, rel=0.01)
    assert SIZES["1.8b"].n_params == pytest.approx(1.89e9, rel=0.01)
    assert SIZES["135m"].n_params == pytest.approx(134.5e6, rel=0.02)
    assert SIZES["8b"].n_params == pytest.approx(8.03e9, rel=0.01)


def test_shape_for_names_sizes_and_files(default_model_path, tmp_path):
    assert shape_for(default_model_path, None) == SIZES["135m"]
    assert shape_for("internlm2-chat-1.8b", None) == SIZES["1.8b"]
    assert shape_for("smollm2", None) == SIZES["135m"]
    assert shape_for("qwen2.5-0.5b", None) == SIZES["0.5b"]
    assert shape_for(None, "7B") == SIZES["7b"]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,'
        ' "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008}'
    )
    assert shape_for(str(folder), None) == SIZES["7b"]
    with pytest.raises(ConfigError, match="7b"):
        shape_for("no-such-model", None)
    with pytest.raises(ConfigError, match="13b"):
        shape_for(None, "3b")


@pytest.mark.parametrize(
    "text, expected",
    [("8GB", 8 * GiB), ("8 GiB", 8 * GiB), ("24g", 24 * GiB), ("512MB", 512 << 20), ("1.5gb", 3 * GiB // 2),
     ("1000000", 1000000), ("64k", 64 << 10), (4096, 4096)],
)  # fmt: skip
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "eight GB", "8XB", "-1GB", "0", "GB", "8GBB"])
def test_parse_memory_names_what_was_wrong(text):
    with pytest.raises(ConfigError) as err:
        parse_memory(text)
    assert repr(text) in str(err.value)


# --------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------

CUDA_8GB = dict(dtype="bfloat16", device_kind="cuda", device_memory=8 * GiB)


def test_7b_qlora_on_an_8gb_gpu():
    p = plan(
        SIZES["7b"],
        method="qlora",
        seq_len=2048,
        micro_batch=1,
        grad_checkpoint=True,
        **CUDA_8GB,
    )
    assert 3.4 * GiB <= p.parts["weights"] <= 4.2 * GiB
    assert p.fits is True and p.peak == sum(p.parts.values())
    assert p.parts["runtime"] == planmod.CONTEXT_ALLOWANCE["cuda"]
    table = p.table()
    for part in PARTS:
        assert part in table
    assert "8.00 GiB" in table and "fits" in table
    assert p.to_dict()["parts"] == p.parts


def test_7b_full_does_not_fit_and_says_what_would():
    p = plan(
        SIZES["7b"],
        method="full",
        seq_len=2048,
        micro_batch=4,
        grad_checkpoint=False,
        **CUDA_8GB,
    )
    assert p.fits is False and "does not fit" in p.table()
    assert p.suggestions and len(p.suggestions) == len(p.options) + (
        0 if any(o.fits for o in p.options) else 1
    )
    assert any(o.fits for o in p.options) or "none of these fits" in p.suggestions[-1]
    # 7B full fine-tuning fits 8 GB only as QLoRA: the fitting suggestion changes the method
    assert [o for o in p.options if o.fits][0].changes["method"] == "qlora"
    for line in p.suggestions:
        assert line in p.table()


def test_suggestions_come_in_order_and_quote_their_own_plan():
    base = dict(
        method="lora", seq_len=4096, micro_batch=4, grad_checkpoint=False, **CUDA_8GB
    )
    p = plan(SIZES["1.8b"], **base)
    assert p.fits is False
    labels = [o.label for o in p.options]
    order = [
        "gradient checkpointing",
        "4-bit base",
        "micro-batch",
        "shorter sequences",
        "8-bit optimizer",
    ]
    firsts = [
        next(i for i, label in enumerate(labels) if label.startswith(word))
        for word in order
    ]
    assert firsts == sorted(firsts)
    for o in p.options:
        again = plan(SIZES["1.8b"], **{**base, **o.changes})
        assert o.peak == again.peak and o.fits == again.fits
        assert planmod.human(o.peak) in p.suggestions[p.options.index(o)]
    mb = next(o for o in p.options if "micro_batch" in o.changes)
    assert (
        mb.changes["micro_batch"] * mb.changes["grad_accum"] == 4
    )  # tokens per step kept


def test_nothing_fits_a_tiny_device():
    p = plan(
        SIZES["13b"],
        method="full",
        seq_len=1024,
        micro_batch=1,
        grad_checkpoint=False,
        **{**CUDA_8GB, "device_memory": 1 * GiB},
    )
    assert p.fits is False and not any(o.fits for o in p.options)
    assert "none of these fits" in p.suggestions[-1]


def test_parts_follow_the_settings():
    s = SIZES["135m"]
    kw = dict(
        seq_len=512,
        micro_batch=2,
        grad_checkpoint=False,
        dtype="float32",
        device_kind="cpu",
        device_memory=None,
        runtime=0,
    )
    lora, full, dpo = (plan(s, method=m, **kw) for m in ("lora", "full", "dpo"))
    assert lora.fits is None and "device memory unknown" in lora.table()
    assert (
        full.parts["gradients"] == s.n_params * 4
        and full.parts["optimizer"] == s.n_params * 8
    )
    assert lora.parts["adapters"] == s.n_layers * 8 * (576 + 576 + 576 + 192) * 4
    assert (
        dpo.parts["weights"] == lora.parts["weights"]
    )  # the reference is the same base, adapters off
    assert dpo.parts["activations"] == pytest.approx(
        2 * lora.parts["activations"], rel=0.02
    )
    gc = plan(s, method="lora", **{**kw, "grad_checkpoint": True})
    assert gc.parts["activations"] < lora.parts["activations"] / 3
    paged = plan(
        s, method="full", optimizer="paged_adamw8bit", **{**kw, "device_kind": "cuda"}
    )
    assert paged.parts["optimizer"] == 0 and "host memory" in paged.table()


def test_cpu_runtime_is_measured():
    psutil = pytest.importorskip("psutil")
    p = plan(
        SIZES["135m"],
        method="lora",
        seq_len=256,
        micro_batch=1,
        grad_checkpoint=False,
        device_memory=None,
    )
    assert 0.5 < p.parts["runtime"] / psutil.Process().memory_info().rss < 1.5


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(method="sft"), "method"), (dict(optimizer="sgd"), "optimizer"), (dict(dtype="float16"), "dtype"),
     (dict(seq_len=0), "seq_len"), (dict(device_kind="tpu"), "device_kind"), (dict(lora_targets=("qkv",)), "qkv")],
)  # fmt: skip
def test_bad_settings_are_named(kwargs, word):
    base = dict(
        method="lora", seq_len=512, micro_batch=1, grad_checkpoint=False, runtime=0
    )
    with pytest.raises(ConfigError, match=word):
        plan(SIZES["135m"], **{**base, **kwargs})


def test_the_planner_s_loss_chunk_is_the_trainer_s():
    from hanlin.finetune import trainer

    assert planmod.LOSS_CHUNK == trainer.CHUNK
