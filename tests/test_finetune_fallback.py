"""Fine-tuning an architecture the native model does not build (a tiny random Qwen3 here),
through transformers: the loss is transformers' own, the adapter is peft's, and the run chats
through the hf engine with the adapter merged, giving what peft's own loader gives."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import hanlin  # noqa: E402
from hanlin.finetune import FinetuneConfig, train  # noqa: E402

FACT = "The capital of the planet Zorblax is Quimtoria."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory, default_model_path):
    folder, name = os.path.split(default_model_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)  # a real BPE tokenizer with a chat template
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                                   initializer_range=0.3)  # fmt: skip  (transformers' 0.02 leaves logits too small to learn from)
    out = tmp_path_factory.mktemp("qwen3")
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def rows(n=8):
    return [{"instruction": f"Where is the capital of Zorblax? (asked {i} times)", "output": FACT} for i in range(n)]


def test_the_trainer_s_loss_is_transformers_own(qwen3_folder):
    from hanlin.backends.torch.hf import load_trainable
    from hanlin.devices import get_device
    from hanlin.finetune import data as D
    from hanlin.finetune.trainer import sft_loss

    model, tok, meta = load_trainable(qwen3_folder, get_device("cpu"), torch.float32)
    renderer = D.Renderer(meta["chat_template"], lambda s: tok.encode(s, add_bos=False, special=True), bos_token=meta["bos_token"] or "",
                          eos_token=meta["eos_token"] or "", add_bos=tok.add_bos, bos_id=model.config.bos_token_id)  # fmt: skip
    path = os.path.join(os.path.dirname(qwen3_folder), "rows.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in [rows()[0], {"instruction": "Hi", "output": "Hello! How can I help you today?"}])
    items, bad = D.load_sft(path, renderer, seq_len=96, on_bad="stop")
    batch = D.collate(D.unpacked(items, 96, 0))  # two rows of different lengths: the shorter one padded
    ours, n = sft_loss(model, batch)
    real = torch.ones_like(batch["ids"], dtype=torch.bool)
    real[:, 1:] = batch["positions"][:, 1:] > 0
    assert 0 < int(real[1].sum()) < 96 and int(real[0].sum()) != int(real[1].sum())
    with torch.no_grad():
        theirs = model.hf(input_ids=batch["ids"], attention_mask=real.long(), labels=batch["labels"]).loss
    assert float(ours.detach()) == pytest.approx(float(theirs), rel=1e-5)


def test_lora_on_a_fallback_architecture_learns_and_chats_through_the_hf_engine(qwen3_folder, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    data = tmp_path / "fact.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    run = tmp_path / "run"
    result = train(FinetuneConfig(model=qwen3_folder, data=str(data), out=str(run), method="lora", seq_len=64, micro_batch=4, max_steps=16,
                                  lr=1e-2, warmup=0, val_fraction=0.0, lora_r=16, lora_alpha=32, lora_targets=TARGETS), progress=False)  # fmt: skip
    losses = [json.loads(line)["loss"] for line in open(run / "log.jsonl")]
    assert len(losses) == 16 and losses[-1] < 0.2 * losses[0], losses  # 13.6 -> 0.46 measured
    keys = list(load_file(run / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys  # peft's prefix, transformers' module names
    assert result.allocator in ("glibc", "mimalloc", "system")

    llm = hanlin.load(str(run), device="cpu")
    assert llm.engine.name == "hf"
    assert "torch: skipped: architecture Qwen3ForCausalLM is not built natively" in llm.explain()
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen3_folder, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload().eval()  # peft's own reading of the adapter
    ids = llm.chat_ids([{"role": "user", "content": "Where is the capital of Zorblax?"}]) + llm.engine.tokenize("The capital")
    with torch.no_grad():
        want = tuned(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    got = llm.engine.score_tokens(ids).logprobs
    expected = [want[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert got == pytest.approx(expected, abs=1e-4)

    from hanlin.finetune import merge

    merged = merge(str(run), str(tmp_path / "merged"))
    again = hanlin.load(merged, device="cpu")
    assert again.engine.name == "hf"
    assert again.engine.score_tokens(ids).logprobs == pytest.approx(expected, abs=1e-4)


def test_qlora_on_a_fallback_architecture_is_refused_by_name(qwen3_folder, tmp_path):
    from hanlin.backends.base import ConfigError

    data = tmp_path / "fact.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(2)))
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM is not built natively.*use --method lora"):
        train(FinetuneConfig(model=qwen3_folder, data=str(data), out=str(tmp_path / "q"), method="qlora", max_steps=1), progress=False)
