"""The fine-tuning benchmark checks its arguments and runs its transformers + peft row end to end
(one step on a tiny random llama built here, with a tiny tokenizer that has a chat template),
counting exactly the real and the labelled tokens of the batch it trained on. Its speed and
memory figures are read by people, not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_finetune.py")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = [
    {"question": "What is 2 plus 2?", "answer": "2 + 2 = 4.\n#### 4"},
    {"question": "Tom has 3 apples and buys 5 more. How many apples does he have?", "answer": "3 + 5 = 8 apples.\n#### 8"},
    {"question": "What is 6 minus 2?", "answer": "6 - 2 = 4.\n#### 4"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "4 * 3 = 12 pens.\n#### 12"},
]


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "hf,foo"], "unknown row 'foo'"),
        (["--rows", ","], "name at least one of hf, hanlin"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "two"], "--steps takes an integer, got 'two'"),
        (["--seq-len", "8"], "--seq-len must be at least 16, got 8"),
        (["--grad-checkpoint", "maybe"], "invalid choice: 'maybe'"),
        (["--data", "/nonexistent/rows.jsonl"], "--data '/nonexistent/rows.jsonl': no such file"),
        (["--model", "/nonexistent/model.gguf"], "does not exist"),
    ],
)
def test_bad_arguments_are_named(args, message):
    out = run_tool(*args, timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert out.stdout == ""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny_llama")
    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [r["question"] + " " + r["answer"] for r in ROWS] + ["user assistant system"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS + ROWS))  # 8 rows: --n-rows 4 takes the first 4
    return str(folder), str(data), tok


def expected_counts(tok, seq_len: int) -> tuple[int, int, int]:
    """Real and labelled tokens of one batch holding all four rows (assistant-only loss), and
    how many rows truncation leaves without a labelled token."""
    real = labelled = unlabelled = 0
    for r in ROWS:
        user = [{"role": "user", "content": r["question"]}]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r["answer"]}], tokenize=False)
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        n = min(len(tok(full, add_special_tokens=False)["input_ids"]), seq_len)
        real += n
        k = max(n - len(tok(prompt, add_special_tokens=False)["input_ids"]), 0)
        labelled += k
        unlabelled += k == 0
    return real, labelled, unlabelled


def test_hf_row_runs_one_step_and_counts_tokens(tiny_llama, tmp_path):
    folder, data, tok = tiny_llama
    seq_len = 64
    out_file = tmp_path / "bench.json"
    out = run_tool("--model", folder, "--data", data, "--rows", "hf", "--steps", "1", "--n-rows", "4", "--batch", "4",
                   "--seq-len", str(seq_len), "--out", str(out_file))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data_out = json.loads(out.stdout)
    assert json.loads(out_file.read_text()) == data_out
    assert data_out["bench"] == "finetune"
    s = data_out["settings"]
    assert (s["steps"], s["batch"], s["seq_len"], s["n_rows"], s["lora"]["r"]) == (1, 4, seq_len, 4, 8)
    assert s["lora"]["targets"] == ["q_proj", "v_proj"]
    [row] = data_out["rows"]
    assert "error" not in row, row
    assert row["row"] == "hf" and row["grad_checkpoint"] is False
    assert row["s_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0.05
    [run] = row["runs"]
    real, labelled, unlabelled = expected_counts(tok, seq_len)
    assert 0 < labelled < real
    assert run["tokens_per_step"] == real  # one batch of the 4 rows: pads not counted
    assert run["labelled_tokens_per_step"] == labelled  # prompt masked to -100
    assert run["padded_tokens_per_step"] >= real
    assert run["timed_steps"] == 1 and run["warmup_skipped"] is False
    assert len(run["losses"]) == 1 and run["losses"][0] > 0 and run["rows_without_labels"] == unlabelled
    assert abs(row["tokens_per_s"] - real / row["s_per_step"]) / row["tokens_per_s"] < 0.01
    assert data_out["ratios"] is None  # no hanlin row asked for
    assert data_out["target"] == {"tokens_per_s": ">= 1.5", "peak_rss": "<= 0.6"}
