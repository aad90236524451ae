"""Shards for the training tests: a small deterministic token stream (arithmetic runs a tiny
model learns within a few steps), written by the real ShardWriter, so no tokenizer is needed."""

from __future__ import annotations

import os

VOCAB = 256


def make_shards(folder, docs: int = 300, seed: int = 0, heldout_every: int = 20, tokens_per_shard: int = 20000) -> str:
    """`docs` documents; every `heldout_every`-th goes to the heldout split (0: no heldout split)."""
    import numpy as np

    from hanlin.train.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    train = ShardWriter(str(folder), "train", vocab_size=VOCAB, eos_id=0, tokens_per_shard=tokens_per_shard)
    held = ShardWriter(str(folder), "heldout", vocab_size=VOCAB, eos_id=0) if heldout_every else None
    for d in range(docs):
        n, start, stride = rng.integers(50, 300), rng.integers(1, 200), rng.integers(1, 5)
        ids = [(start + stride * i) % (VOCAB - 1) + 1 for i in range(n)]
        (held if held is not None and d % heldout_every == 0 else train).add(ids)
    splits = {"train": train.close(), **({"heldout": held.close()} if held is not None else {})}
    write_manifest(str(folder), splits, vocab_size=VOCAB, eos_id=0)
    return str(folder)
