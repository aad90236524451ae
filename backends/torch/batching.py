"""Continuous batching for the native engine: sequences join and leave a running batch
between decode steps.

`SlotBatch` owns one static KV cache with `max_batch` rows ("slots"). A sequence is admitted
into a free slot (its prompt prefilled into that row alone), takes part in every decode step
while it runs, and gives its slot back when it ends; the next sequence reuses the row from
position 0. Each row sits at its own length, so a decode step writes each row's new key and
value at that row's own position and masks every row to its own slots.

A step runs rows [0, highest busy slot + 1): free slots are handed out lowest first, so the
rows run stay packed. On the CPU a step's cost is the weights streaming through (8 rows cost
about what 1 does, see cpu_pack.py), so idle rows in that range cost little.

This module is synchronous and owns no thread or queue: the server's scheduler drives it
(admit, step, release) and does the sampling per request, each with its own settings.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hanlin.backends.torch.generate import KVCache, prefill
from hanlin.backends.torch.model import Transformer


class _RowCache:
    """One row of a KVCache, as a cache of batch 1 (views: writes land in the shared cache)."""

    def __init__(self, cache: KVCache, row: int):
        self.layers = [(k[row : row + 1], v[row : row + 1]) for k, v in cache.layers]
        self.max_len = cache.max_len


class Prefix:
    """A prompt prefix run once (the few-shot examples many requests share): its tokens and its
    keys and values, which admit_many copies into each new slot instead of recomputing them."""

    @torch.inference_mode()
    def __init__(self, model: Transformer, tokens: Sequence[int]):
        param = next(model.parameters())
        self.tokens = list(tokens)
        self.cache = KVCache(model, 1, len(self.tokens), param.dtype, param.device)
        prefill(model, self.cache, torch.tensor([self.tokens], device=param.device), 0)


class SlotBatch:
    def __init__(self, model: Transformer, max_batch: int, max_len: int):
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.max_batch, self.max_len = max_batch, max_len
        self.cache = KVCache(model, max_batch, max_len, param.dtype, param.device)
        self.lengths = [0] * max_batch  # tokens held by each slot
        self.busy = [False] * max_batch

    @property
    def running(self) -> int:
        return sum(self.busy)

    def free_slots(self) -> int:
        return self.max_batch - self.running

    def admit(self, prompt_ids: Sequence[int]) -> tuple[int, torch.Tensor]:
        """Prefill prompt_ids into the lowest free slot; returns (slot, next-token logits (V,))."""
        if len(prompt_ids) == 0 or len(prompt_ids) >= self.max_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit a slot of {self.max_len}")
        slot = self.busy.index(False)  # ValueError when full: the scheduler checks free_slots() first
        tokens = torch.tensor([list(prompt_ids)], device=self.device)  # (1, T)
        logits = prefill(self.model, _RowCache(self.cache, slot), tokens, 0)  # (1, V)
        self.busy[slot], self.lengths[slot] = True, len(prompt_ids)
        return slot, logits[0]

    @torch.inference_mode()
    def admit_many(self, prompts: Sequence[Sequence[int]], prefix: "Prefix | None" = None) -> list[tuple[int, torch.Tensor]]:
        """Prefill several prompts in one forward pass into the lowest free slots; returns
        (slot, next-token logits (V,)) per prompt, in order.

        The prompts are right-padded into a temporary cache (padding keys are masked out), then
        copied into their slots' rows: one pass over the weights for all of them, where admit()
        would take one pass each (measured on the 2-core CPU: 8 chat prompts of ~35 tokens,
        0.30 s one by one, see tools/bench_serve.py). With a `prefix` that every prompt starts
        with (a few-shot prompt), its keys and values are copied in and only the rest runs."""
        free = [i for i, busy in enumerate(self.busy) if not busy][: len(prompts)]
        if len(free) < len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(free)} free slots")
        P = len(prefix.tokens) if prefix is not None else 0
        for p in prompts:
            if len(p) <= P or len(p) >= self.max_len:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit a slot of {self.max_len} (after a prefix of {P})")
            if P and list(p[:P]) != prefix.tokens:
                raise ValueError("a prompt does not start with the prefix it is admitted after")
        n, L = len(prompts), max(len(p) for p in prompts) - P  # L: the longest suffix
        lens = torch.tensor([len(p) - P for p in prompts], device=self.device)  # (n,) suffix lengths
        tokens = torch.zeros(n, L, dtype=torch.long, device=self.device)  # (n, L), right-padded suffixes
        for i, p in enumerate(prompts):
            tokens[i, : len(p) - P] = torch.tensor(list(p[P:]), device=self.device)
        slots = torch.arange(P + L, device=self.device)
        q = slots[P:]  # the slots the suffixes are written to
        causal = q[:, None] >= slots[None, :]  # (L, P+L) query i sees keys j <= i (the prefix included)
        real = slots[None, :] < (P + lens)[:, None]  # (n, P+L) keys that are prompt tokens
        mask = (causal[None] & real[:, None, :])[:, None]  # (n, 1, L, P+L); key 0 is real for every row
        tmp = KVCache(self.model, n, P + L, self.cache.layers[0][0].dtype, self.device)
        if P:
            for (k, v), (pk, pv) in zip(tmp.layers, prefix.cache.layers):
                k[:, :, :P] = pk
                v[:, :, :P] = pv
        logits = self.model(tokens, q.expand(n, L), mask, tmp.layers, q, P + L, logits_at=lens - 1)[:, 0]  # (n, V)
        rows = torch.tensor(free, device=self.device)
        for (k, v), (tk, tv) in zip(self.cache.layers, tmp.layers):
            k[:, :, : P + L].index_copy_(0, rows, tk)  # padding copied too: masked, and overwritten as the row grows
            v[:, :, : P + L].index_copy_(0, rows, tv)
        for slot, p in zip(free, prompts):
            self.busy[slot], self.lengths[slot] = True, len(p)
        return [(slot, logits[i]) for i, slot in enumerate(free)]

    def release(self, slot: int) -> None:
        self.busy[slot], self.lengths[slot] = False, 0

    def room(self, slot: int) -> int:
        """Tokens slot can still take before its row is full."""
        return self.max_len - self.lengths[slot]

    @torch.inference_mode()
    def step(self, next_tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        """One decode step: next_tokens maps each busy slot to the token it feeds now; returns
        each slot's logits (V,) for the token after."""
        for slot in next_tokens:
            if not self.busy[slot] or self.lengths[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is free or full")
        rows = max(next_tokens) + 1  # B: run rows [0, rows)
        if any(self.busy[r] and r not in next_tokens for r in range(rows)):
            raise ValueError("every busy slot takes part in a step (an idle row writes at position 0 of its slot)")
        tokens = torch.zeros(rows, 1, dtype=torch.long)  # (B, 1); idle rows feed token 0
        pos = torch.zeros(rows, dtype=torch.long)  # (B,) where each row writes; idle rows at 0
        for slot, tok in next_tokens.items():
            tokens[slot, 0], pos[slot] = tok, self.lengths[slot]
        kv_len = int(pos.max()) + 1
        visible = torch.arange(kv_len)[None, :] <= pos[:, None]  # (B, S): row b sees its slots 0..pos[b]
        tokens, pos, visible = tokens.to(self.device), pos.to(self.device), visible.to(self.device)
        layers = [(k[:rows], v[:rows]) for k, v in self.cache.layers]
        logits = self.model(tokens, pos[:, None], visible[:, None, None, :], layers, pos, kv_len, last_only=True)[:, -1]  # (B, V)
        for slot in next_tokens:
            self.lengths[slot] += 1
        return {slot: logits[slot] for slot in next_tokens}
