"""The transformers fallback engine: a folder whose architecture the native model does not
build (a tiny random GPT-2 here) is routed to it, and it generates what transformers does."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hanlin  # noqa: E402
from hanlin.backends.base import perplexity  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, default_model_path):
    folder, name = os.path.split(default_model_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)  # a real byte-level BPE tokenizer
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), model, tok


def test_unsupported_architecture_falls_back_to_hf(gpt2_folder):
    folder, ref, tok = gpt2_folder
    llm = hanlin.load(folder, device="cpu")
    assert llm.engine.name == "hf"
    assert "torch: skipped: architecture GPT2LMHeadModel is not built natively" in llm.explain()
    msgs = [{"role": "user", "content": "Hello there"}]
    ids = llm.chat_ids(msgs)
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    done = llm.chat(msgs, temperature=0, repeat_penalty=1.0, max_tokens=12)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in want:
        want = want[: want.index(tok.eos_token_id) + 1]
    assert done.token_ids == want
    assert done.text == tok.decode(want, skip_special_tokens=True)


def test_hf_engine_scores_like_its_model(gpt2_folder):
    folder, ref, tok = gpt2_folder
    llm = hanlin.load(folder, device="cpu", engine="hf")
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 6)[:64]
    res = perplexity(llm.engine, ids, 32)
    with torch.no_grad():
        logits = ref(torch.tensor([ids[:32]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    want = [lp[i - 1, ids[i]].item() for i in range(16, 32)]
    assert res.logprobs[:16] == pytest.approx(want, abs=1e-6)


def test_native_engine_refuses_what_it_cannot_build(gpt2_folder):
    from hanlin.backends.base import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="engine 'torch' cannot run this model here: architecture GPT2LMHeadModel is not built natively"):
        hanlin.load(gpt2_folder[0], device="cpu", engine="torch")
