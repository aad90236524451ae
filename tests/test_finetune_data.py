"""hanlin.finetune.data: rows -> chat-template token ids, the assistant-only mask, packing, splits, DPO.

Real JSONL files (tmp_path), the default model's real tokenizer and chat template (SmolLM2, ChatML
with a default system message), and a tiny random-weight native model for the packing check.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from hanlin.finetune.data import (
    IGNORE,
    DataError,
    Example,
    Pair,
    Renderer,
    collate,
    collate_pairs,
    load_dpo,
    load_sft,
    pack,
    read_jsonl,
    row_messages,
    row_pair,
    split,
    unpacked,
)

GEN = "<|im_start|>assistant\n"  # SmolLM2's generation prompt
EOT = "<|im_end|>\n"  # what its template writes after every message


@pytest.fixture(scope="module")
def tok(default_model_path):
    from hanlin.backends.tokenizer import LlamaCppTokenizer

    return LlamaCppTokenizer(default_model_path)


@pytest.fixture(scope="module")
def template(default_model_path):
    from hanlin.backends.gguf.gguf_file import validate_gguf

    t = validate_gguf(default_model_path).chat_template
    assert "<|im_start|>" in t
    return t


@pytest.fixture(scope="module")
def renderer(tok, template):
    return Renderer(template, lambda text: tok.encode(text, add_bos=False, special=True))


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_bos=False, special=True)


def dec(tok, ids) -> str:
    """Token ids -> text, special tokens written out (bytes joined first: a character may span tokens)."""
    return b"".join(tok.token_bytes(i) or tok.special_text(i).encode() for i in ids).decode("utf-8")


def write_jsonl(path, lines: list) -> str:
    """Each item: a dict (dumped as JSON) or a str (written as it is, e.g. '' or broken JSON)."""
    with open(path, "w", encoding="utf-8") as f:
        for x in lines:
            f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return str(path)


def convo(*turns: str, system: str | None = None) -> list[dict]:
    """convo("q1", "a1", "q2", "a2") -> user/assistant messages."""
    out = [{"role": "system", "content": system}] if system is not None else []
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def render_text(template, messages, gen=False):
    from hanlin.chat_template import render

    return render(template, messages, add_generation_prompt=gen)


# --------------------------------------------------------------------------------------
# Rendering and the assistant-only mask
# --------------------------------------------------------------------------------------


def test_template_inserts_default_system_message(template):
    text = render_text(template, convo("hi", "hello"))
    assert text.startswith("<|im_start|>system\n") and "SmolLM" in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")


def test_mask_token_by_token(tok, template, renderer):
    answers = ["The capital of France is Paris.", "Rome, of course!"]
    messages = convo("What is the capital of France?", answers[0], "And of Italy?", answers[1], system="Be brief.")
    ids, labels = renderer.sft(messages)
    full = render_text(template, messages)
    assert ids == enc(tok, full)  # the segment-wise ids are the ids of the whole text
    assert len(labels) == len(ids)
    assert all(lab in (IGNORE, t) for lab, t in zip(labels, ids))

    # Where the assistant tokens are, found independently: right after each generation prompt
    # in the token stream come exactly the tokens of "answer<|im_end|>\n".
    gen_ids = enc(tok, GEN)
    expected = set()
    starts = [i + len(gen_ids) for i in range(len(ids)) if ids[i : i + len(gen_ids)] == gen_ids]
    assert len(starts) == 2
    for start, answer in zip(starts, answers):
        span = enc(tok, answer + EOT)
        assert ids[start : start + len(span)] == span
        expected |= set(range(start, start + len(span)))
    labelled = {i for i, lab in enumerate(labels) if lab != IGNORE}
    assert labelled == expected

    # Decoded, token by token: the learned text is the answers + end-of-turn, nothing else,
    # and everything else is system / user / template text.
    learned = [dec(tok, [ids[i]]) for i in sorted(labelled)]
    assert "".join(learned) == "".join(a + EOT for a in answers)
    unlearned = "".join(dec(tok, [t]) for t, lab in zip(ids, labels) if lab == IGNORE)
    expected_rest = full
    for a in answers:
        expected_rest = expected_rest.replace(a + EOT, "", 1)
    assert unlearned == expected_rest
    assert "What is the capital of France?" in unlearned and "Be brief." in unlearned
    assert not any(a in unlearned for a in answers)


@pytest.mark.parametrize(
    "messages",
    [
        convo("hi", "hello"),
        convo("Translate: chat", " le chat ", "and dog?", "le chien"),
        convo("List three fruits:\n", "\n- apple\n- pear\n- fig\n\n", system="You answer in lists."),
        convo("Écris « bonjour » 😀", "Bonjour ! 😀 你好"),
        convo("code?", "```python\nprint('x')\n```", "thanks", "You're welcome.  "),
    ],
)
def test_segment_tokenization_equals_whole_text(tok, template, renderer, messages):
    ids, labels = renderer.sft(messages)
    assert ids == enc(tok, render_text(template, messages))
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert dec(tok, learned) == "".join(m["content"] + EOT for m in messages if m["role"] == "assistant")


def test_reply_starting_with_whitespace_is_tokenized_as_generated(tok, template, renderer):
    # Whole-text BPE would merge the template's "\n" with the reply's leading spaces into one
    # token ("\n "), half template, half reply. Segment-wise, the prompt is tokenized on its
    # own and the reply after it, which is what the model sees when it generates.
    messages = convo("Indent this.", "  indented")
    ids, labels = renderer.sft(messages)
    prompt = enc(tok, render_text(template, messages[:1], gen=True))
    reply = enc(tok, "  indented" + EOT)
    assert ids == prompt + reply
    assert labels == [IGNORE] * len(prompt) + reply
    assert ids != enc(tok, render_text(template, messages))  # what the whole-text tokenization would give


def test_add_bos_prepends_once(tok, template):
    bos = 1  # SmolLM2's BOS id is <|im_start|>; the point is only where it goes
    r = Renderer(template, lambda s: enc(tok, s), add_bos=True, bos_id=bos)
    plain = Renderer(template, lambda s: enc(tok, s))
    ids, labels = r.sft(convo("hi", "hello"))
    ids0, labels0 = plain.sft(convo("hi", "hello"))
    assert ids == [bos] + ids0 and labels == [IGNORE] + labels0
    # A template that writes the BOS itself does not get a second one.
    own = Renderer("{{ bos_token }}" + template, lambda s: enc(tok, s), bos_token="<|im_start|>", add_bos=True, bos_id=bos)
    ids2, _ = own.sft(convo("hi", "hello"))
    assert ids2 == ids


def test_template_that_is_not_prefix_consistent_stops_the_run(tmp_path, tok):
    # This template writes the last message differently, so a conversation's rendering does not
    # start with its prefixes' renderings: the assistant's tokens cannot be located.
    bad = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %} [last]{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    r = Renderer(bad, lambda s: enc(tok, s))
    path = write_jsonl(tmp_path / "d.jsonl", ["", {"messages": convo("a", "b", "c", "d")}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: the chat template renders message 1"):
        load_sft(path, r, seq_len=256)


# --------------------------------------------------------------------------------------
# Row formats
# --------------------------------------------------------------------------------------


def test_formats_give_the_same_messages_and_ids(renderer):
    expected = convo("Add the numbers.\n\n2 and 3", "5", system="You are a calculator.")
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "You are a calculator."},
        {
            "conversations": [
                {"from": "system", "value": "You are a calculator."},
                {"from": "human", "value": "Add the numbers.\n\n2 and 3"},
                {"from": "gpt", "value": "5"},
            ]
        },
        {"messages": expected},
    ]
    for row in rows:
        assert row_messages(row) == expected
    assert len({tuple(renderer.sft(row_messages(r))[0]) for r in rows}) == 1

    # alpaca without input / with an empty input, no system; sharegpt's user/assistant spellings
    short = convo("Say hi.", "Hi!")
    for row in [
        {"instruction": "Say hi.", "output": "Hi!"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"conversations": [{"from": "user", "value": "Say hi."}, {"from": "assistant", "value": "Hi!"}]},
        {"messages": short},
    ]:
        assert row_messages(row) == short


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "x"}, "output is missing"),
        ({"instruction": "x", "output": 3}, "output is a int"),
        ({"output": "y"}, "instruction is missing"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": []}, "messages is empty"),
        ({"messages": "hi"}, "expected a list"),
        ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, "content is missing"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with an assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "is empty"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'from': 'bot'"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
        ({"conversations": []}, "conversations is empty"),
        ({"text": "hello"}, "not a known row format"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "DPO row"),
    ],
)
def test_row_messages_rejects(row, reason):
    with pytest.raises(ValueError, match=reason):
        row_messages(row)


# --------------------------------------------------------------------------------------
# Files, bad rows, truncation
# --------------------------------------------------------------------------------------


def sft_file(tmp_path) -> str:
    return write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"instruction": "Say hi.", "output": "Hi!"},  # 1
            "",  # 2 blank: skipped, but counted
            '{"instruction": "broken", ',  # 3 bad JSON
            {"instruction": "No answer."},  # 4 missing output
            "   ",  # 5 blank
            {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]},  # 6 unknown role
            {"messages": [{"role": "user", "content": "q"}]},  # 7 no assistant
            "[1, 2, 3]",  # 8 not an object
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},  # 9
        ],
    )


def test_bad_rows_reported_with_line_numbers_and_skipped(tmp_path, renderer):
    path = sft_file(tmp_path)
    examples, bad = load_sft(path, renderer, seq_len=256)
    assert [e.line for e in examples] == [1, 9]
    assert [b.line for b in bad] == [3, 4, 6, 7, 8]
    reasons = {b.line: b.reason for b in bad}
    assert "not valid JSON" in reasons[3]
    assert "output is missing" in reasons[4]
    assert "unknown role 'wizard'" in reasons[6]
    assert "no assistant turn" in reasons[7]
    assert "not an object" in reasons[8]
    assert examples[1].ids == renderer.sft(convo("2+2?", "4"))[0]


def test_on_bad_stop_names_file_and_line(tmp_path, renderer):
    path = sft_file(tmp_path)
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        load_sft(path, renderer, seq_len=256, on_bad="stop")
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "a", "output": "b"}, "", {"instruction": "c", "output": "d"}])
    examples, bad = load_sft(good, renderer, seq_len=256, on_bad="stop")
    assert [e.line for e in examples] == [1, 3] and bad == []
    with pytest.raises(ValueError, match="on_bad='maybe'"):
        load_sft(good, renderer, seq_len=256, on_bad="maybe")


def test_file_without_good_rows_or_missing_raises(tmp_path, renderer):
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "", {"instruction": "x"}])
    with pytest.raises(DataError, match=r"no usable rows \(2 bad; the first bad one, line 1: not valid JSON"):
        load_sft(only_bad, renderer, seq_len=256)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match="no usable rows"):
        load_sft(empty, renderer, seq_len=256)
    with pytest.raises(DataError, match="no such file"):
        load_sft(str(tmp_path / "missing.jsonl"), renderer, seq_len=256)


def test_read_jsonl_non_utf8_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    rows, bad = read_jsonl(str(path), lambda r: r["a"])
    assert rows == [(1, 1)] and [b.line for b in bad] == [2] and "UTF-8" in bad[0].reason


def test_long_rows_are_truncated_or_bad(tmp_path, tok, renderer):
    long_answer = " ".join(["word"] * 200)
    long_question = " ".join(["why"] * 300)
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [{"instruction": "Talk.", "output": long_answer}, {"instruction": long_question, "output": "Because."}],
    )
    examples, bad = load_sft(path, renderer, seq_len=100)
    full_ids, full_labels = renderer.sft(convo("Talk.", long_answer))
    assert len(full_ids) > 100
    assert [e.line for e in examples] == [1]
    assert examples[0].ids == full_ids[:100] and examples[0].labels == full_labels[:100]
    assert [b.line for b in bad] == [2]
    assert bad[0].reason == "longer than seq_len=100 with no assistant token in the first 100"


# --------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_sized():
    items = list(range(100))
    train, val = split(items, 0.1, seed=3)
    assert split(items, 0.1, seed=3) == (train, val)
    assert split(items, 0.1, seed=4) != (train, val)
    assert len(val) == 10 and len(train) == 90
    assert set(train).isdisjoint(val) and sorted(train + val) == items
    assert train == sorted(train) and val == sorted(val)  # each part keeps file order
    assert split(items, 0.0, seed=0) == (items, [])
    assert [len(v) for _, v in [split(list(range(n)), 0.05, 0) for n in (1, 2, 3, 30, 50)]] == [0, 1, 1, 2, 2]
    tr, va = split([1, 2], 0.9, 0)  # never empties train
    assert len(tr) == 1 and len(va) == 1
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        split(items, 1.0, 0)


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def ex(n: int, line: int, start: int = 0) -> Example:
    """An example of n tokens (ids start, start+1..); the second half is 'assistant'."""
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE if i < n // 2 else t for i, t in enumerate(ids)], line)


def test_pack_keeps_every_token_once_with_restarting_positions():
    examples = [ex(n, line=i + 1, start=1000 * (i + 1)) for i, n in enumerate([5, 9, 3, 7, 2, 6, 4, 8, 1])]
    seq = pack(examples, 12, pad_id=0)
    assert all(len(p.ids) == len(p.labels) == len(p.positions) == len(p.docs) == 12 for p in seq)
    assert len(seq) == 4  # 45 tokens in 4 sequences of 12: 9+3, 8+4, 7+5, 6+2+1 (optimal)
    docs = Counter()
    for p in seq:
        n_docs = max(p.docs) + 1
        assert sorted(set(p.docs) - {-1}) == list(range(n_docs))
        for d in range(n_docs):
            where = [i for i, x in enumerate(p.docs) if x == d]
            assert where == list(range(where[0], where[0] + len(where)))  # contiguous
            assert [p.positions[i] for i in where] == list(range(len(where)))
            assert p.labels[where[0]] == IGNORE
            docs[tuple(p.ids[i] for i in where)] += 1
        pad = [i for i, x in enumerate(p.docs) if x == -1]
        assert pad == list(range(12 - len(pad), 12))  # padding at the end
        assert all(p.ids[i] == 0 and p.labels[i] == IGNORE for i in pad)
    assert docs == Counter(tuple(e.ids) for e in examples)  # no document lost, split or duplicated
    # labels are carried over except the first of each document
    by_first = {e.ids[0]: e for e in examples}
    for p in seq:
        for i, (t, d) in enumerate(zip(p.ids, p.docs)):
            if d >= 0 and p.positions[i] > 0:
                e = by_first[p.ids[i - p.positions[i]]]
                assert p.labels[i] == e.labels[p.positions[i]]


def test_pack_first_fit_decreasing_and_limits():
    seq = pack([ex(3, 1), ex(6, 2), ex(4, 3), ex(5, 4), ex(2, 5)], 10, pad_id=7)
    lengths = [[p.docs.count(d) for d in range(max(p.docs) + 1)] for p in seq]
    assert lengths == [[6, 4], [5, 3, 2]]  # 6 -> bin 0; 5 -> bin 1; 4 -> bin 0; 3 -> bin 1; 2 -> bin 1
    with pytest.raises(DataError, match="line 9 has 11 tokens, more than seq_len=10"):
        pack([ex(3, 1), ex(11, 9)], 10, pad_id=0)
    one = unpacked([ex(3, 1), ex(10, 2)], 10, pad_id=7)
    assert [p.docs for p in one] == [[0, 0, 0] + [-1] * 7, [0] * 10]
    assert one[0].ids == [0, 1, 2] + [7] * 7 and one[0].labels[:3] == [IGNORE, 1, 2]


def test_collate_mask_block_diagonal_causal():
    torch = pytest.importorskip("torch")
    # one sequence: doc 0 = 3 tokens, doc 1 = 2 tokens, 2 padding
    p = pack([Example([11, 12, 13], [IGNORE, 12, 13], 1), Example([21, 22], [21, 22], 2)], 7, pad_id=0)
    assert len(p) == 1 and p[0].docs == [0, 0, 0, 1, 1, -1, -1]
    b = collate(p)
    assert b["ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22, IGNORE, IGNORE]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert b["ids"].dtype == b["labels"].dtype == b["positions"].dtype == torch.long
    assert b["mask"].shape == (1, 1, 7, 7) and b["mask"].dtype == torch.bool
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # padding: itself only
        [0, 0, 0, 0, 0, 0, 1],
    ]
    assert b["mask"][0, 0].int().tolist() == expected
    with pytest.raises(ValueError, match="different lengths"):
        collate(pack([ex(3, 1)], 5, 0) + pack([ex(3, 1)], 6, 0))


def test_packed_logits_equal_each_document_alone(tmp_path, tok, renderer):
    torch = pytest.importorskip("torch")
    from hanlin.backends.torch.model import ModelConfig, Transformer

    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Name a colour.", "output": "Blue."},
            {"messages": convo("Count to three.", "1, 2, 3.", "Now backwards.", "3, 2, 1.")},
            {"instruction": "Capital of Japan?", "output": "Tokyo."},
        ],
    )
    examples, _ = load_sft(path, renderer, seq_len=256)
    seq_len = sum(len(e.ids) for e in examples) + 5
    seq = pack(examples, seq_len, pad_id=0)
    assert len(seq) == 1 and max(seq[0].docs) == 2
    batch = collate(seq)

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=512)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        packed = model(batch["ids"], positions=batch["positions"], mask=batch["mask"])  # (1, T, V)
        causal_only = model(batch["ids"])  # no per-document mask, positions 0..T-1
        assert torch.isfinite(packed).all()  # padding rows too
        docs = torch.tensor(seq[0].docs)
        for d in range(3):
            where = (docs == d).nonzero().flatten()
            ids = batch["ids"][:, where]
            alone = model(ids)  # (1, L, V)
            torch.testing.assert_close(packed[:, where], alone, atol=1e-5, rtol=0)
            if d > 0:  # the check can fail: without the mask, later documents see earlier ones
                assert not torch.allclose(causal_only[:, where], alone, atol=1e-3)


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def test_row_pair_forms():
    msgs = [{"role": "user", "content": "Pick a colour."}]
    for row in [
        {"prompt": "Pick a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": msgs, "chosen": {"role": "assistant", "content": "Blue."}, "rejected": {"role": "assistant", "content": "No."}},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]},
    ]:
        assert row_pair(row) == (msgs, "Blue.", "No.")
    multi = convo("Hi.", "Hello!", "Pick a colour.", system="Be nice.")
    assert row_pair({"prompt": multi, "chosen": "Blue.", "rejected": "No."}) == (multi, "Blue.", "No.")
    for row, reason in [
        ({"chosen": "a", "rejected": "b"}, "needs 'prompt'"),
        ({"prompt": "p", "rejected": "b"}, "chosen is missing"),
        ({"prompt": "p", "chosen": "a", "rejected": 5}, "rejected is a int"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "the same text"),
        ({"prompt": "p", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "chosen has role 'user'"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"}, "list of 2 messages"),
        ({"prompt": convo("q", "a"), "chosen": "x", "rejected": "y"}, "ends with an assistant turn"),
        ({"prompt": [], "chosen": "x", "rejected": "y"}, "empty list"),
        ({"prompt": "", "chosen": "x", "rejected": "y"}, "prompt is empty"),
    ]:
        with pytest.raises(ValueError, match=reason):
            row_pair(row)


def test_renderer_pair_matches_sft(tok, renderer):
    prompt = convo("Hi.", "Hello!", "Pick a colour.", system="Be nice.")
    p, c, r = renderer.pair(prompt, "Blue.", "I won't.")
    gen = enc(tok, GEN)
    assert p[-len(gen) :] == gen  # the prompt ends with the generation prompt
    assert dec(tok, c) == "Blue." + EOT and dec(tok, r) == "I won't." + EOT
    ids, labels = renderer.sft([*prompt, {"role": "assistant", "content": "Blue."}])
    assert p + c == ids
    assert labels[len(p) :] == c  # the completion is exactly the final assistant turn's learned tokens
    assert p + r == renderer.sft([*prompt, {"role": "assistant", "content": "I won't."}])[0]


def test_collate_pairs_labels_only_completions():
    torch = pytest.importorskip("torch")
    pairs = [Pair([1, 2, 3], [4, 5], [6], 1), Pair([7], [8, 9, 10], [11, 12], 2)]
    b = collate_pairs(pairs, pad_id=0)
    assert b["ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    X = IGNORE
    assert b["labels"].tolist() == [[X, X, X, 4, 5], [X, 8, 9, 10, X], [X, X, X, 6, X], [X, 11, 12, X, X]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0, 1, 2, 0, 0]]
    assert b["mask"].shape == (4, 1, 5, 5) and b["mask"].dtype == torch.bool
    assert b["mask"][3, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert b["mask"][0, 0].int().tolist() == torch.ones(5, 5).tril().int().tolist()


def test_load_dpo_truncation_and_bad_rows(tmp_path, tok, renderer):
    long_prompt = " ".join(["please"] * 120)
    long_answer = " ".join(["yes"] * 120)
    path = write_jsonl(
        tmp_path / "dpo.jsonl",
        [
            {"prompt": "Pick a colour.", "chosen": "Blue.", "rejected": "No."},  # 1
            "",  # 2
            {"prompt": long_prompt, "chosen": "Sure.", "rejected": "No way, I refuse."},  # 3: prompt cut from the left
            {"prompt": "Go.", "chosen": long_answer, "rejected": "No."},  # 4: a completion alone does not fit
            {"prompt": "Go.", "chosen": "x"},  # 5: rejected missing
            "not json",  # 6
            {"instruction": "a", "output": "b"},  # 7: an SFT row
        ],
    )
    pairs, bad = load_dpo(path, renderer, seq_len=80)
    assert [p.line for p in pairs] == [1, 3]
    assert [b.line for b in bad] == [4, 5, 6, 7]
    assert "does not fit seq_len=80" in bad[0].reason and "rejected is missing" in bad[1].reason
    assert "needs 'prompt'" in bad[3].reason

    full_p, full_c, full_r = renderer.pair([{"role": "user", "content": long_prompt}], "Sure.", "No way, I refuse.")
    p = pairs[1]
    assert (p.chosen, p.rejected) == (full_c, full_r)  # completions whole
    assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) == 80
    assert p.prompt == full_p[len(full_p) - len(p.prompt) :]  # the prompt's end is kept
    assert pairs[0] == Pair(*renderer.pair([{"role": "user", "content": "Pick a colour."}], "Blue.", "No."), line=1)

    with pytest.raises(DataError, match=rf"^{path}:4: a completion has"):
        load_dpo(path, renderer, seq_len=80, on_bad="stop")
