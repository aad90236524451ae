"""The native PyTorch engine against its references: transformers' own implementations on
tiny random-weight models, transformers and llama.cpp on the real default model."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is part of the dev install")
transformers = pytest.importorskip("transformers")

import hanlin  # noqa: E402
from hanlin.backends.base import GenerationConfig, ModelError, loglikelihood, perplexity  # noqa: E402
from hanlin.backends.torch import model as M  # noqa: E402
from hanlin.backends.torch.generate import KVCache, generate_batch, generate_one  # noqa: E402
from hanlin.backends.torch.weights import load_hf_folder, save_hf_folder  # noqa: E402

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "wikitext2", "test.txt")
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def tiny_hf(family: str, tmp_path, **overrides):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**TINY, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**{**TINY, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    model.eval()
    folder = tmp_path / family
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}}),
        ("qwen2", {"tie_word_embeddings": False}),
        ("qwen2", {"tie_word_embeddings": True}),
    ],
    ids=["llama", "llama-tied", "llama-rope-linear", "llama-rope-llama3", "qwen2", "qwen2-tied"],
)
def test_tiny_models_match_transformers(tmp_path, family, overrides):
    ref, folder = tiny_hf(family, tmp_path, **overrides)
    ours = load_hf_folder(folder)
    x = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    assert (want - got).abs().max().item() < 1e-4
    if family == "qwen2":
        assert ours.layers[0].self_attn.q_proj.bias is not None and ours.layers[0].self_attn.o_proj.bias is None


def test_internlm2_packed_wqkv_matches_the_llama_layout(tmp_path):
    from safetensors.torch import save_file

    ref, folder = tiny_hf("llama", tmp_path)
    llama = load_hf_folder(folder)
    cfg = llama.config
    g, D, K = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, cfg.n_kv_heads
    sd = llama.state_dict()
    packed = {"model.tok_embeddings.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].reshape(K, g, D, cfg.dim)
        k = sd[p + "self_attn.k_proj.weight"].reshape(K, 1, D, cfg.dim)
        v = sd[p + "self_attn.v_proj.weight"].reshape(K, 1, D, cfg.dim)
        packed[f"model.{p}attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, cfg.dim)
        packed[f"model.{p}attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        packed[f"model.{p}feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        packed[f"model.{p}feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        packed[f"model.{p}feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        packed[f"model.{p}attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        packed[f"model.{p}ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out = tmp_path / "internlm2"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in packed.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": TINY["vocab_size"],
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "bias": False, "tie_word_embeddings": False,
    }))  # fmt: skip
    intern = load_hf_folder(str(out))
    x = torch.randint(0, TINY["vocab_size"], (1, 30))
    with torch.no_grad():
        assert (intern(x) - ref(x).logits).abs().max().item() < 1e-4


def test_save_is_hf_compatible_and_round_trips(tmp_path):
    ref, folder = tiny_hf("llama", tmp_path)
    ours = load_hf_folder(folder)
    out = tmp_path / "saved"
    save_hf_folder(ours, str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    again = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    x = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (again(x).logits - ref(x).logits).abs().max().item() < 1e-5
    save_hf_folder(ours, str(out))  # overwriting an existing folder keeps it whole
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hanlin-save-") or p.endswith(".old")]


def test_bad_folders_name_what_is_wrong(tmp_path):
    _, folder = tiny_hf("llama", tmp_path)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    bad = tmp_path / "arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match="architecture GPTNeoXForCausalLM is not one the native engine builds.*LlamaForCausalLM"):
        load_hf_folder(str(bad))
    wrong = tmp_path / "shape"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    os.link(os.path.join(folder, "model.safetensors"), wrong / "model.safetensors")
    with pytest.raises(ModelError, match=r"weight layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape \[.*\] but the config needs \[.*128.*\]"):
        load_hf_folder(str(wrong))
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(folder, "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing weight layers\.1\.self_attn\.k_proj\.weight"):
        load_hf_folder(str(missing))
    with pytest.raises(ModelError, match="has no config.json"):
        load_hf_folder(str(tmp_path))


def test_static_cache_decoding_equals_full_recompute(tmp_path):
    _, folder = tiny_hf("llama", tmp_path)
    model = load_hf_folder(folder)
    prompt = [5, 17, 99, 3, 42, 7]
    cfg = GenerationConfig(temperature=0, repeat_penalty=1.0, max_tokens=20)
    cache = KVCache(model, 1, 64, torch.float32, torch.device("cpu"))
    got = [s.token_id for s in generate_one(model, cache, prompt, cfg, 20)]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    # a second prompt sharing a prefix reuses the cache and still decodes the same as fresh
    longer = prompt + got[:5] + [11]
    reused = [s.token_id for s in generate_one(model, cache, longer, cfg, 10)]
    fresh = [s.token_id for s in generate_one(model, KVCache(model, 1, 64, torch.float32, torch.device("cpu")), longer, cfg, 10)]
    assert reused == fresh


def test_batched_generation_of_different_lengths_equals_one_by_one(tmp_path):
    _, folder = tiny_hf("qwen2", tmp_path)
    model = load_hf_folder(folder)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42], [7, 7, 7, 7, 7]]
    cfg = GenerationConfig(temperature=0, repeat_penalty=1.0, max_tokens=12)
    batch = generate_batch(model, prompts, cfg, 12)
    for p, out in zip(prompts, batch):
        single = [s.token_id for s in generate_one(model, KVCache(model, 1, 64, torch.float32, torch.device("cpu")), p, cfg, 12)]
        assert out == single


def test_op_table_swaps_a_kernel_without_editing_the_model(tmp_path):
    _, folder = tiny_hf("llama", tmp_path)
    model = load_hf_folder(folder)
    x = torch.randint(0, TINY["vocab_size"], (1, 10))
    calls = []

    def counting_rms_norm(h, w, eps):
        calls.append(h.shape)
        return M.rms_norm(h, w, eps)

    M.register_op("rms_norm", "cpu", counting_rms_norm)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        del M.OPS[("rms_norm", "cpu")]
    assert len(calls) == 2 * TINY["num_hidden_layers"] + 1  # two per block and the final norm
    with torch.no_grad():
        assert torch.equal(out, model(x))


def test_trainable_with_gradient_checkpointing(tmp_path):
    _, folder = tiny_hf("llama", tmp_path)
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    grads = []
    for ckpt in (False, True):
        model = load_hf_folder(folder).train()
        model.gradient_checkpointing = ckpt
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        grads.append(model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- the real default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def native(default_model_path):
    m = hanlin.load(default_model_path, device="cpu", engine="torch")
    yield m
    m.close()


@pytest.fixture(scope="module")
def gguf_llm(default_model_path):
    m = hanlin.load(default_model_path, device="cpu", engine="gguf", ctx_size=4096)
    yield m
    m.close()


def test_real_model_matches_transformers_on_the_same_gguf(native, default_model_path):
    folder, name = os.path.split(default_model_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = native.chat_ids([{"role": "user", "content": "Explain photosynthesis in two sentences."}])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
        got = native.engine.model(torch.tensor([ids]))
    assert (want - got).abs().max().item() < 1e-3


def test_real_model_agrees_with_llama_cpp_on_wikitext(native, gguf_llm):
    with open(WIKITEXT, encoding="utf-8") as f:
        text = f.read(60_000)
    ids = gguf_llm.engine.tokenize(text)[:4096]
    assert len(ids) == 4096
    ref = perplexity(gguf_llm.engine, ids, 1024)
    ours = perplexity(native.engine, ids, 1024)
    agree = sum(a == b for a, b in zip(ref.argmax, ours.argmax)) / len(ref.argmax)
    assert agree >= 0.95, agree
    assert abs(ours.perplexity / ref.perplexity - 1) <= 0.02, (ours.perplexity, ref.perplexity)
    assert ref.tokens_scored == ours.tokens_scored == 2048


def test_tokenizer_ids_equal_llama_cpp_and_transformers(native, gguf_llm, default_model_path):
    text = "Hello, world! 你好，世界。 def f(x):\n    return x**2  # ünïcödé 🙂\n\t<|im_start|>"
    folder, name = os.path.split(default_model_path)
    hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    want = hf.encode(text, add_special_tokens=False)
    assert native.engine.tokenize(text) == gguf_llm.engine.tokenize(text) == want
    assert native.detokenize(want) == text.replace("<|im_start|>", "")  # special tokens add no text


def test_greedy_chat_and_batched_chat_on_the_real_model(native):
    msgs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colours.", "Say hi.")]
    singles = [native.chat(m, temperature=0, repeat_penalty=1.0, max_tokens=16).token_ids for m in msgs]
    assert "Paris" in native.detokenize(singles[0])
    batch = native.engine.generate_batch([native.chat_ids(m) for m in msgs], GenerationConfig(temperature=0, repeat_penalty=1.0, max_tokens=16))
    assert batch == singles


def test_loglikelihood_agrees_between_engines(native, gguf_llm):
    ctx = native.tokenize("The capital of France is")
    good, bad = native.tokenize(" Paris"), native.tokenize(" Banana")
    for eng in (native.engine, gguf_llm.engine):
        lp_good, greedy_good = loglikelihood(eng, ctx, good)
        lp_bad, _ = loglikelihood(eng, ctx, bad)
        assert lp_good > lp_bad and lp_good < 0
    a, _ = loglikelihood(native.engine, ctx, good)
    b, _ = loglikelihood(gguf_llm.engine, ctx, good)
    assert abs(a - b) < 0.5  # float weights vs llama.cpp's Q4_1 arithmetic


def test_compile_falls_back_to_eager_cleanly(tmp_path, monkeypatch):
    """Where torch.compile cannot build the decode step, generation goes on eagerly, the same."""
    from hanlin.backends.torch.generate import CompiledDecode

    _, folder = tiny_hf("llama", tmp_path)
    model = load_hf_folder(folder)
    cfg = GenerationConfig(temperature=0, repeat_penalty=1.0, max_tokens=10)
    eager = [s.token_id for s in generate_one(model, KVCache(model, 1, 64, torch.float32, torch.device("cpu")), [3, 1, 4], cfg, 10)]

    def broken_compile(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    cache = KVCache(model, 1, 64, torch.float32, torch.device("cpu"))
    step = CompiledDecode(model, cache)
    got = [s.token_id for s in generate_one(model, cache, [3, 1, 4], cfg, 10, step)]
    assert got == eager
    assert step.error == "RuntimeError: no C++ compiler here"


def test_sharded_safetensors_with_an_index(tmp_path):
    torch.manual_seed(1)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    ours = load_hf_folder(str(folder))
    x = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < 1e-4
    next(folder.glob("model-*.safetensors")).unlink()
    with pytest.raises(ModelError, match="shard model-.*safetensors named in model.safetensors.index.json is missing"):
        load_hf_folder(str(folder))


def test_qwen2_gguf_loads_like_its_hf_weights(tmp_path):
    """A qwen2 GGUF (float32, written here with the gguf package) gives the HF model's logits:
    qwen2 keeps its q/k rows unpermuted and its q/k/v biases."""
    gguf = pytest.importorskip("gguf")
    from hanlin.backends.torch.weights import load_gguf

    ref, _ = tiny_hf("qwen2", tmp_path, tie_word_embeddings=False)
    c = ref.config
    w = gguf.GGUFWriter(str(tmp_path / "tiny-qwen2.gguf"), "qwen2")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for name, t in ref.state_dict().items():
        if name in names:
            gname = names[name]
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{parts[part]}.{kind}"
        w.add_tensor(gname, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_gguf(str(tmp_path / "tiny-qwen2.gguf"))
    assert ours.config.arch == "qwen2" and ours.config.qkv_bias
    x = torch.randint(0, TINY["vocab_size"], (1, 24))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)], ids=["qwen2-biases", "llama-tied-head"])
def test_cpu_packed_linears_match_dense_and_unpack_exactly(tmp_path, family, tied):
    from hanlin.backends.torch import cpu_pack

    if not cpu_pack.available():
        pytest.skip("this torch build has no oneDNN linear packing")  # every x86/ARM wheel we support has it
    _, folder = tiny_hf(family, tmp_path, tie_word_embeddings=tied)
    model = load_hf_folder(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, TINY["vocab_size"], (3, 17))
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42]]
    cfg = GenerationConfig(temperature=0, repeat_penalty=1.0, max_tokens=10)
    with torch.no_grad():
        dense = model(x)
    dense_gen = generate_batch(model, prompts, cfg, 10)

    assert cpu_pack.pack_linears(model) == 7 * TINY["num_hidden_layers"] + 1
    assert cpu_pack.pack_linears(model) == 0  # idempotent
    attn = model.layers[0].self_attn
    assert attn.cpu_packed.sizes == [64, 32, 32] and model.layers[0].mlp.cpu_packed.sizes == [96, 96]  # q/k/v and gate/up fused
    assert attn.q_proj.weight.numel() == 0  # the dense copy is released...
    assert model.lm_head.weight.numel() == (TINY["vocab_size"] * 64 if tied else 0)  # ...unless the embedding shares it
    with torch.no_grad():
        packed = model(x)
    assert (packed - dense).abs().max().item() < 1e-4
    assert generate_batch(model, prompts, cfg, 10) == dense_gen
    with pytest.raises(RuntimeError, match="unpack_linears"):
        model(x[:, :4]).sum().backward()  # training a packed model is refused by name
    with pytest.raises(RuntimeError, match="unpack_linears"):
        cpu_pack.packed_linear(torch.randn(1, 64), attn.k_proj)  # a member of a fused group alone

    cpu_pack.unpack_linears(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact
    assert model.lm_head.weight is model.embed_tokens.weight if tied else True
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0


def test_the_cpu_engine_runs_on_packed_weights(native):
    from hanlin.backends.torch import cpu_pack

    if not cpu_pack.available():
        pytest.skip("this torch build has no oneDNN linear packing")
    assert native.engine.packed_linears == 7 * native.engine.model.config.n_layers + 1


def test_cpu_weights_on_huge_pages_change_no_number(native, default_model_path, monkeypatch):
    from hanlin.backends.hugepages import unavailable

    ids = native.tokenize("The lighthouse keeper climbed the stairs at dusk, as every evening.")
    assert native.engine.metadata()["huge_pages_note"] == "turned off by HANLIN_HUGE_PAGES"  # conftest's setting
    monkeypatch.delenv("HANLIN_HUGE_PAGES")
    big = hanlin.load(default_model_path, device="cpu", engine="torch")  # the default: asked for
    meta = big.engine.metadata()
    if unavailable():
        assert meta["huge_pages_note"] == unavailable()
    else:  # most of the packed float32 weights (~540 MB) moved (measured 218-364 MiB), not a few pages
        assert meta["huge_pages_mib"] >= 128, meta
    assert big.engine.score_tokens(ids).logprobs == native.engine.score_tokens(ids).logprobs
    big.close()
