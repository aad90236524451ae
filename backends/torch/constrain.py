"""Structured output for the native engine: a JSON Schema becomes a token mask at every step.

xgrammar compiles the schema against this model's vocabulary (each token's exact bytes, as
the engine decodes them) into a grammar; a `Constraint` follows one sequence through it and,
before each draw, sets the logits of every token that cannot continue valid JSON to -inf. So
the output parses and validates however small the model: the model only chooses among
tokens the schema allows, and once the JSON is complete only EOS is left.

Whitespace is not free (`any_whitespace=False`): JSON is written compactly, so a small model
cannot spend its token budget on spaces and newlines inside the object.

Per sequence and step the work is one `fill_next_token_bitmask` (xgrammar, C++) and one
in-place masked fill of the logits; a request without a schema never reaches this module.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from hanlin.backends.base import ConfigError

# Compiled grammars kept per engine: a server sees a few schemas, over and over.
SCHEMA_CACHE_SIZE = 64


class GrammarCompiler:
    """One per engine: the vocabulary is read once; compiled schemas are cached by their text."""

    def __init__(self, engine: Any):
        import xgrammar

        self._xg = xgrammar
        # V is the logits' width: the embedding rows, which may pad past the tokenizer.
        self.vocab_size = V = engine.model.config.vocab_size
        n_tokens = min(getattr(engine.tok, "vocab_size", None) or V, V)
        # Raw bytes per id; special tokens decode to b"", which xgrammar never allows.
        # Ids in [n_tokens, V) (padding) are unknown to xgrammar and always masked.
        vocab = [engine.token_bytes(i) for i in range(n_tokens)]
        self.stop_token_ids = sorted(engine.eos_token_ids)
        info = xgrammar.TokenizerInfo(
            vocab,
            xgrammar.VocabType.RAW,
            vocab_size=V,
            stop_token_ids=self.stop_token_ids,
        )
        self._compiler = xgrammar.GrammarCompiler(info)
        self._compile = functools.lru_cache(maxsize=SCHEMA_CACHE_SIZE)(
            self._compile_uncached
        )
        # (ceil(V / 32),) int32, every bit set but the stop tokens': "may more than EOS
        # follow?" is one AND with the next-token bitmask.
        self._not_stop = xgrammar.allocate_token_bitmask(1, V)[0]
        for t in self.stop_token_ids:
            bit = torch.tensor(1, dtype=torch.int32) << (t % 32)  # int32: bit 31 = sign
            self._not_stop[t // 32] &= ~bit

    def constraint(self, json_schema: str) -> Constraint:
        """A fresh matcher for one sequence (the compiled grammar is cached); ConfigError
        when the schema cannot be compiled."""
        return Constraint(
            self._xg, self._compile(json_schema), self.vocab_size, self._not_stop
        )

    def _compile_uncached(self, json_schema: str) -> Any:
        try:
            return self._compiler.compile_json_schema(json_schema, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:  # the message says why
            first = str(e).splitlines()[0]
            why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # drop the C++ log prefix
            raise ConfigError(f"json_schema is invalid or unsupported: {why}") from None


class Constraint:
    """One sequence's place in the grammar.

    The next step's bitmask is computed when a token is accepted (and once at the start), so
    `mask_` only applies it and `is_done` reads it: the JSON is done exactly when nothing but
    a stop token may follow. (xgrammar's `is_completed` is weaker: after "12" an integer is
    complete yet "123" may still come.)
    """

    def __init__(
        self, xgrammar: Any, compiled: Any, vocab_size: int, not_stop: torch.Tensor
    ):
        self._xg = xgrammar
        # terminates once it has accepted a stop token
        self._matcher = xgrammar.GrammarMatcher(compiled)
        # (1, ceil(V / 32)) int32, bit set = allowed next
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._not_stop = not_stop  # (ceil(V / 32),) int32
        self.vocab_size = vocab_size
        self._refill()

    def _refill(self) -> None:
        if self._matcher.is_terminated():
            self._only_stop = True  # a stop token was accepted: nothing may follow
            return
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._only_stop = not bool((self._bitmask[0] & self._not_stop).any())

    def mask_(self, logits: torch.Tensor) -> None:
        """logits (V,) or (1, V), float: tokens the grammar forbids become -inf, in place."""
        view = logits if logits.dim() == 2 else logits[None]  # (1, V)
        bitmask = self._bitmask
        if view.device.type != "cpu":  # filled on the CPU; applied beside the logits
            bitmask = bitmask.to(view.device, non_blocking=True)
        self._xg.apply_token_bitmask_inplace(view, bitmask, vocab_size=self.vocab_size)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; a token the mask forbade is a bug in the caller."""
        if not self._matcher.accept_token(token_id):
            why = "it was masked out: the sampler ignored the mask"
            raise RuntimeError(f"token {token_id} breaks the grammar ({why})")
        self._refill()

    @property
    def is_done(self) -> bool:
        """The JSON is complete: only EOS may follow."""
        return self._only_stop
