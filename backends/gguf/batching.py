"""Several requests at once on llama.cpp: each request is a llama.cpp sequence ("slot") in one
context, and one llama_decode per step runs the next token of every running sequence.

The same shape as the torch engine's SlotBatch (admit, step, release), over llama.cpp's C API
through llama-cpp-python's bindings: a context of its own on the engine's loaded model
(weights shared, not loaded twice) with `n_seq_max` sequences, each with `ctx_per_slot` tokens
of KV cache (kv_unified off: sequences do not share cells); per slot a llama.cpp sampler chain
in llama.cpp's own order (grammar first when the request has a JSON schema, then penalties,
top-k, top-p, min-p, temperature, a seeded draw; greedy at temperature 0), so a slot samples
exactly as the engine's one-request path does.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

from hanlin.backends.base import PENALTY_LAST_N, GenerationConfig



class GGUFSlots:
    def __init__(self, engine: Any, max_batch: int, ctx_per_slot: int):
        import llama_cpp as L

        self.L, self.engine = L, engine
        self.max_batch, self.max_len = max_batch, ctx_per_slot
        model = engine._llm._model.model
        self.vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        params = L.llama_context_default_params()
        params.n_ctx = ctx_per_slot * max_batch
        params.n_seq_max = max_batch
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = engine.threads
        params.kv_unified = False
        self.ctx = L.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {max_batch} sequences of {ctx_per_slot} tokens")
        self.batch = L.llama_batch_init(params.n_batch, 0, 1)
        self.n_batch = params.n_batch
        self.busy = [False] * max_batch
        self.lengths = [0] * max_batch
        self.samplers: list[Any] = [None] * max_batch
        self.logit_rows: dict[int, int] = {}  # slot -> batch row holding its latest logits

    @property
    def running(self) -> int:
        return sum(self.busy)

    def free_slots(self) -> int:
        return self.max_batch - self.running

    def room(self, slot: int) -> int:
        return self.max_len - self.lengths[slot]

    # ---- batches ---------------------------------------------------------------------------

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, slot, wants logits), at most n_batch of them."""
        b = self.batch
        for i, (tok, pos, slot, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = slot
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")

    def admit(self, prompt_ids: Sequence[int], config: GenerationConfig) -> int:
        """Prefill a prompt into the lowest free slot (in chunks of n_batch); returns the slot."""
        if len(prompt_ids) == 0 or len(prompt_ids) >= self.max_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit a slot of {self.max_len}")
        slot = self.busy.index(False)
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), slot, -1, -1)
        ids = list(prompt_ids)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self._decode([(t, start + j, slot, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        self.logit_rows[slot] = (len(ids) - 1) % self.n_batch  # the last token's row in the last chunk
        self.samplers[slot] = self._sampler_chain(config, ids)
        self.busy[slot], self.lengths[slot] = True, len(ids)
        return slot

    def step(self, feed: dict[int, int]) -> None:
        """One token per running slot; afterwards each slot's logits are ready for sample()."""
        items = []
        for row, (slot, tok) in enumerate(sorted(feed.items())):
            if not self.busy[slot] or self.lengths[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is free or full")
            items.append((tok, self.lengths[slot], slot, True))
            self.logit_rows[slot] = row
        self._decode(items)
        for slot in feed:
            self.lengths[slot] += 1

    def sample(self, slot: int, want_logprob: bool, top: int = 0) -> tuple[int, float | None, tuple[tuple[int, float], ...]]:
        """Draw the slot's next token with its sampler chain (which also records it, for the
        penalties and the grammar); its log-probability under the model when asked."""
        row = self.logit_rows[slot]
        tok = int(self.L.llama_sampler_sample(self.samplers[slot], self.ctx, row))
        if not want_logprob and not top:
            return tok, None, ()
        import numpy as np

        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).astype(np.float64)
        m = float(logits.max())
        logz = m + math.log(float(np.exp(logits - m).sum()))
        best: tuple[tuple[int, float], ...] = ()
        if top:
            idx = np.argpartition(-logits, top)[:top]
            idx = idx[np.argsort(-logits[idx])]
            best = tuple((int(i), float(logits[i] - logz)) for i in idx)
        return tok, float(logits[tok] - logz), best

    def release(self, slot: int) -> None:
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), slot, -1, -1)
        if self.samplers[slot] is not None:
            self.L.llama_sampler_free(self.samplers[slot])
        self.samplers[slot] = None
        self.busy[slot], self.lengths[slot] = False, 0

    def close(self) -> None:
        for slot in range(self.max_batch):
            if self.samplers[slot] is not None:
                self.L.llama_sampler_free(self.samplers[slot])
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)

    # ---- sampling ----------------------------------------------------------------------------

    def _sampler_chain(self, config: GenerationConfig, prompt: list[int]) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if config.json_schema:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            gbnf = json_schema_to_gbnf(config.json_schema)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root"))
        penalties = L.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, config.repeat_penalty, 0.0, 0.0)
        for tok in prompt[-PENALTY_LAST_N:]:  # the penalties see the prompt (the grammar must not)
            L.llama_sampler_accept(penalties, tok)
        L.llama_sampler_chain_add(chain, penalties)
        if config.greedy:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if config.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(config.top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(config.top_p, 1))
            if config.min_p > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(config.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(config.temperature))
            seed = config.seed if config.seed is not None else random.getrandbits(31)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain
