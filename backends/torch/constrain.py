"""Structured output for the native engine: a JSON Schema becomes a token mask at every step.

xgrammar compiles the schema against this model's vocabulary (each token's exact bytes, as
the engine decodes them) into a grammar; a `Constraint` follows one sequence through it and,
before each draw, sets the logits of every token that cannot continue valid JSON to -inf. So
the output parses and validates however small the model: the model only chooses among
tokens the schema allows, and once the JSON is complete only EOS is left.

Whitespace is not free (`any_whitespace=False`): JSON is written compactly, so a small model
cannot spend its token budget on spaces and newlines inside the object.
"""

from __future__ import annotations

from typing import Any

import torch

from hanlin.backends.base import ConfigError


class GrammarCompiler:
    """One per engine: the vocabulary is read once; compiled schemas are cached by their text."""

    def __init__(self, engine: Any):
        import xgrammar

        self._xg = xgrammar
        n_tokens = getattr(engine.tok, "vocab_size", None) or engine.model.config.vocab_size
        vocab = [engine.token_bytes(i) for i in range(n_tokens)]  # raw bytes; special tokens are b"" (never allowed mid-JSON)
        self.vocab_size = engine.model.config.vocab_size  # V, the logits' width (may pad past the tokenizer)
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=sorted(engine.eos_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info)
        self._cache: dict[str, Any] = {}

    def constraint(self, json_schema: str) -> "Constraint":
        compiled = self._cache.get(json_schema)
        if compiled is None:
            try:
                compiled = self._compiler.compile_json_schema(json_schema, any_whitespace=False)
            except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with a reason
                raise ConfigError(f"json_schema is invalid or unsupported: {str(e).splitlines()[0]}") from None
            self._cache[json_schema] = compiled
        return Constraint(self._xg, compiled, self.vocab_size)


class Constraint:
    """One sequence's place in the grammar."""

    def __init__(self, xgrammar: Any, compiled: Any, vocab_size: int):
        self._xg = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)  # done when the JSON is
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32
        self.vocab_size = vocab_size

    def mask_(self, logits: torch.Tensor) -> None:
        """logits (V,) or (1, V), float: tokens the grammar forbids next become -inf, in place."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        view = logits if logits.dim() == 2 else logits[None]
        self._xg.apply_token_bitmask_inplace(view, self._bitmask.to(view.device), vocab_size=self.vocab_size)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} breaks the grammar (it was masked out: the sampler ignored the mask)")

    @property
    def is_done(self) -> bool:
        """The JSON is complete: only EOS may follow."""
        return self._matcher.is_terminated()
