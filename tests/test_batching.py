"""Continuous batching (backends/torch/batching.py): sequences that join and leave a running
batch decode exactly as they do alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hanlin.backends.base import GenerationConfig  # noqa: E402
from hanlin.backends.torch.batching import SlotBatch  # noqa: E402
from hanlin.backends.torch.generate import KVCache, generate_one  # noqa: E402
from hanlin.backends.torch.model import ModelConfig, Transformer  # noqa: E402

GREEDY = GenerationConfig(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128)
    return Transformer(cfg).eval()


def alone(model, prompt, n):
    return [s.token_id for s in generate_one(model, KVCache(model, 1, 128, torch.float32, torch.device("cpu")), prompt, GREEDY, n)]


def test_joining_and_leaving_between_steps_changes_nothing(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42], [7, 7, 7, 7, 7], [11, 13, 17, 19], [5, 3]]
    lengths = [12, 5, 9, 14, 3, 7]  # each leaves after its own number of tokens
    want = [alone(model, p, n) for p, n in zip(prompts, lengths)]
    batch = SlotBatch(model, 3, 64)  # fewer slots than requests: slots are reused
    pending = list(range(len(prompts)))
    running: dict[int, int] = {}  # slot -> request
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step = 0
    while pending or running:
        if pending and batch.free_slots() and step % 2 == 0:  # join every other step, two at a time when they fit
            take = pending[: min(2, batch.free_slots())]
            pending = pending[len(take) :]
            for i, (slot, logits) in zip(take, batch.admit_many([prompts[i] for i in take])):
                running[slot] = i
                out[i].append(int(logits.argmax()))
        for slot, i in list(running.items()):
            if len(out[i]) >= lengths[i]:
                batch.release(slot)
                del running[slot]
        if running:
            for slot, logits in batch.step({s: out[i][-1] for s, i in running.items()}).items():
                out[running[slot]].append(int(logits.argmax()))
        step += 1
    assert [out[i][: lengths[i]] for i in range(len(prompts))] == want


def test_one_by_one_admission_matches_batched_admission(model):
    a, b = SlotBatch(model, 4, 64), SlotBatch(model, 4, 64)
    prompts = [[3, 1, 4, 1, 5], [2, 7], [1, 8, 2, 8, 1, 8]]
    one = [a.admit(p) for p in prompts]
    many = b.admit_many(prompts)
    assert [s for s, _ in one] == [s for s, _ in many] == [0, 1, 2]
    for (_, x), (_, y) in zip(one, many):
        assert torch.allclose(x, y, atol=1e-5)


def test_bad_use_is_refused(model):
    batch = SlotBatch(model, 2, 16)
    s0, _ = batch.admit([1, 2])
    s1, _ = batch.admit([3])
    with pytest.raises(ValueError, match="every busy slot"):
        batch.step({s1: 5})  # slot 0 is busy but not fed: its row would be overwritten
    with pytest.raises(ValueError, match="does not fit"):
        SlotBatch(model, 1, 16).admit(list(range(16)))
    with pytest.raises(ValueError, match="free slots"):
        batch.admit_many([[1]])
    batch.release(s0)
    assert batch.free_slots() == 1 and batch.lengths[s0] == 0
