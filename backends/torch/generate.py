"""Generation for the native Transformer: a static KV cache, prefill, decode, sampling.

gpt-fast style, in small functions:
- `KVCache` preallocates (B, K, S_max, D) keys and values per layer once; nothing grows.
- `prefill` runs the prompt (or its part that is not cached yet) in one forward pass.
- `decode_step` runs one token per sequence.
- `sample` picks the next tokens on the model's device (penalty, top-k, top-p, min-p,
  temperature, seeded torch.Generator; greedy at temperature 0).
- `generate_batch` decodes several prompts of different lengths together: they are
  left-padded, and a mask keeps each sequence from seeing another's padding.

Stop handling is not here: the engine passes raw tokens through base.apply_stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from hanlin.backends.base import PENALTY_LAST_N, GenerationConfig
from hanlin.backends.torch.model import Transformer



class KVCache:
    """Per-layer (keys, values), each (B, K, S_max, D), allocated once."""

    def __init__(self, model: Transformer, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        cfg = model.config
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.tokens: list[int] = []  # single-sequence use: what the cache holds, for prefix reuse


@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, start: int, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Run tokens (B, T) into cache slots [start, start + T); return last-position logits (B, V)."""
    B, T = tokens.shape
    if positions is None:
        positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
    if mask is None and start > 0 and T > 1:
        # new tokens after a cached prefix: causal within the new part, all of the prefix visible
        q = torch.arange(start, start + T, device=tokens.device)[:, None]
        mask = (torch.arange(start + T, device=tokens.device)[None, :] <= q)[None, None]
    cache_pos = torch.arange(start, start + T, device=tokens.device)
    logits = model(tokens, positions, mask, cache.layers, cache_pos, start + T, last_only=True)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, pos: int, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence (B,) written at slot pos; return logits (B, V)."""
    B = tokens.shape[0]
    if positions is None:
        positions = torch.full((B, 1), pos, device=tokens.device)
    cache_pos = torch.tensor([pos], device=tokens.device)
    return model(tokens[:, None], positions, mask, cache.layers, cache_pos, pos + 1, last_only=True)[:, -1]


def apply_repeat_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """llama.cpp's repeat penalty: logits of recently seen tokens are divided by the penalty
    when positive and multiplied when negative. logits (B, V), recent (B, N) token ids."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, recent)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, recent, seen)


def sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids (B,) and their log-probabilities under the model (B,), on the device.

    logits (B, V) float32, after any penalty. Order as in llama.cpp's sampler chain:
    top-k, top-p, min-p, temperature, then a draw (or argmax at temperature 0).
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    if config.greedy:
        ids = logits.argmax(dim=-1)
        return ids, logprobs.gather(1, ids[:, None])[:, 0]
    x, idx = logits, None  # x: (B, N) candidates; idx: their token ids when N < V
    if config.top_k > 0 and config.top_k < x.shape[-1]:
        x, idx = torch.topk(x, config.top_k, dim=-1)  # (B, k), sorted: the rest works on k, not V
    if config.top_p < 1.0:
        sorted_x, order = (x, None) if idx is not None else torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs > config.top_p  # keep the smallest set reaching top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = sorted_x if order is None else x.scatter(1, order, sorted_x)
    if config.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < config.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    probs = torch.softmax(x / config.temperature, dim=-1)
    ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
    if idx is not None:
        ids = idx.gather(1, ids[:, None])[:, 0]
    return ids, logprobs.gather(1, ids[:, None])[:, 0]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


@dataclass
class RawStep:
    token_id: int
    logprob: float


class CompiledDecode:
    """decode_step through torch.compile, falling back to eager on the first failure.

    Measured on the 2-core CPU this was written on (SmolLM2-135M, float32): 63 s of
    compilation for 26.0 tok/s against 23.9 eager, so it is off by default and offered
    (`compile=True`) for long-running servers and GPUs, where the trade is different.
    """

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self.error: str | None = None

        def step(tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
            return model(tokens, positions, None, cache.layers, cache_pos, kv_len, last_only=True)[:, -1]

        self._compiled = torch.compile(step, dynamic=True)

    def __call__(self, model: Transformer, cache: KVCache, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if self.error is None:
            try:
                with torch.no_grad():  # inference_mode tensors cannot pass through dynamo
                    return self._compiled(tokens[:, None], torch.full((tokens.shape[0], 1), pos), torch.tensor([pos]), pos + 1)
            except Exception as e:  # an unsupported op, no compiler, ...: say so once, run eager
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
        return decode_step(model, cache, tokens, pos)


def generate_one(model: Transformer, cache: KVCache, prompt: Sequence[int], config: GenerationConfig, max_new: int, step=None, constraint=None) -> Iterator[RawStep]:
    """Stream tokens for one prompt, reusing the longest cached prefix of the last call.
    step: the decode function (decode_step, or a CompiledDecode); constraint: a
    constrain.Constraint that masks each step's logits (structured output), or None."""
    decode = step or decode_step
    device = next(model.parameters()).device
    prompt = list(prompt)
    reuse = 0
    for a, b in zip(cache.tokens, prompt[:-1]):  # at least one token must run to get logits
        if a != b:
            break
        reuse += 1
    cache.tokens = cache.tokens[:reuse]
    gen = make_generator(config.seed, device)
    logits = prefill(model, cache, torch.tensor([prompt[reuse:]], device=device), reuse)
    cache.tokens = list(prompt)
    history = torch.tensor([prompt[-PENALTY_LAST_N:]], device=device)
    for i in range(max_new):
        if constraint is not None:
            constraint.mask_(logits)
        ids, lps = sample(apply_repeat_penalty(logits, history, config.repeat_penalty), config, gen)
        tok = int(ids[0])
        if constraint is not None:
            constraint.accept(tok)
        yield RawStep(tok, float(lps[0]))
        pos = len(cache.tokens)
        if i + 1 >= max_new or pos >= cache.max_len:
            return
        logits = decode(model, cache, ids, pos)
        cache.tokens.append(tok)
        history = torch.cat([history, ids[:, None]], dim=1)[:, -PENALTY_LAST_N:]


PREFIX_MIN = 32  # tokens a batch of prompts must share before the prefix is run once


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix(seqs: Sequence[Sequence[int]], minimum: int = PREFIX_MIN) -> int:
    """Length of the prefix all seqs share, leaving each at least one token of its own; 0 when
    it is shorter than `minimum` (not worth a separate pass)."""
    n = min([len(s) - 1 for s in seqs] + [common_prefix(seqs[0], s) for s in seqs[1:]])
    return n if n >= minimum else 0


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig, max_new: int, eos_ids: frozenset[int] = frozenset()) -> list[list[int]]:
    """Decode several prompts of different lengths together; each stops at EOS or max_new.

    Prompts are left-padded to the longest; position ids start at 0 for every sequence's first
    real token, and the mask hides padding slots from every query.
    """
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)  # (B,)
    tokens = torch.tensor([[0] * (L - len(p)) + list(p) for p in prompts], device=device)  # (B, L)
    slots = torch.arange(L + max_new, device=device)
    real = slots[None, :] >= pad[:, None]  # (B, S): which slots hold real tokens
    positions = (torch.arange(L, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, L)
    causal = slots[None, :L, None] >= slots[None, None, :L]  # (1, L, L) query i sees keys j <= i
    diag = torch.eye(L, dtype=torch.bool, device=device)[None]  # padding rows see themselves (no empty rows)
    mask = ((causal & real[:, None, :L]) | diag)[:, None]  # (B, 1, L, L)
    cache = KVCache(model, B, L + max_new, next(model.parameters()).dtype, device)
    logits = prefill(model, cache, tokens, 0, mask=mask, positions=positions)
    gen = make_generator(config.seed, device)
    history = tokens[:, -PENALTY_LAST_N:]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids) or [-1], device=device)
    for step in range(max_new):
        ids, _ = sample(apply_repeat_penalty(logits, history, config.repeat_penalty), config, gen)
        for seq, tok, finished in zip(out, ids.tolist(), done.tolist()):
            if not finished:
                seq.append(tok)
        done |= torch.isin(ids, eos)
        if bool(done.all()) or step + 1 >= max_new:
            break
        pos = L + step
        step_mask = real[:, None, None, : pos + 1]  # (B, 1, 1, S)
        step_pos = (pos - pad)[:, None]  # (B, 1)
        logits = decode_step(model, cache, ids, pos, mask=step_mask, positions=step_pos)
        history = torch.cat([history, ids[:, None]], dim=1)[:, -PENALTY_LAST_N:]
    return out
