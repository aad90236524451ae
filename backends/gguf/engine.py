"""GGUFEngine: llama.cpp through llama-cpp-python.

Why this engine is shaped the way it is:
- The file is validated by our own reader (gguf_file.py) before llama.cpp opens it: llama.cpp
  can abort the whole process on a truncated file, and a user deserves a sentence instead.
- Threads default to the physical core count: llama.cpp's matmuls are memory-bound and
  hyper-threads only add contention (llama.cpp's own advice).
- Layers go to the accelerator (n_gpu_layers=-1) only when the device asked for is one and
  this llama.cpp build can offload; otherwise everything stays on the CPU, and
  `available()` says why an accelerator cannot be used.
- Sampling is llama.cpp's own sampler chain (penalties, top-k, top-p, min-p, temperature,
  seeded dist; greedy at temperature 0), so hanlin samples exactly like llama.cpp does.
  Stop handling is the shared `apply_stops` from base.py.
- Llama.generate keeps the longest common prefix of the previous prompt in the KV cache,
  so a multi-turn chat only evaluates the new turn.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, ClassVar, Iterator, Sequence

from hanlin.backends.base import (
    Capabilities,
    ConfigError,
    GenerationConfig,
    RawToken,
    TokenEvent,
    TokenScores,
    check_load_options,
    check_scorable,
    detokenize_bytes,
    register,
    stream_tokens,
)
from hanlin.backends.gguf.gguf_file import validate_gguf
from hanlin.devices import Device
from hanlin.devices.tools import installed

DEFAULT_MAX_CTX = 4096  # a phone-friendly default; --ctx-size raises it up to the model's own


@register
class GGUFEngine:
    name: ClassVar[str] = "gguf"
    capabilities: ClassVar[Capabilities] = Capabilities(
        formats=frozenset({"gguf"}),
        device_kinds=frozenset({"cpu", "cuda", "mps"}),
        gpu_offload=True,
        logprobs=True,
        embeddings=True,
        grammar=True,
        priority=100,  # a .gguf is llama.cpp's own format: prefer it for GGUF files
    )

    @classmethod
    def available(cls, device: Device) -> str | None:
        if not installed("llama_cpp"):
            return "llama-cpp-python not installed (pip install 'hanlin[gguf]')"
        if device.kind == "cpu":
            return None
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            return f"this llama-cpp-python build has no GPU offload, so it cannot use {device.spec()} (rebuild it with CMAKE_ARGS=-DGGML_CUDA=on, or use --device cpu)"
        return None

    @classmethod
    def load(
        cls,
        path: str,
        device: Device,
        *,
        ctx_size: int | None = None,
        threads: int | None = None,
        gpu_layers: int | None = None,
        verbose: bool = False,
        **_: Any,
    ) -> "GGUFEngine":
        info = validate_gguf(path)  # raises ModelError before llama.cpp sees a bad file
        ctx_size, threads = check_load_options(ctx_size, threads, trained=info.context_length or DEFAULT_MAX_CTX, default_max=DEFAULT_MAX_CTX,
                                               device=device, model=os.path.basename(path) + "'s")  # fmt: skip
        if gpu_layers is None:
            gpu_layers = -1 if device.kind != "cpu" else 0

        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=ctx_size,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            logits_all=False,
            verbose=verbose,
        )
        return cls(llm, info, path, device, threads=threads, gpu_layers=gpu_layers)

    def __init__(self, llm: Any, info: Any, path: str, device: Device, *, threads: int, gpu_layers: int):
        self._llm = llm
        self._info = info
        self.model_path = path
        self.device = device
        self.threads = threads
        self.gpu_layers = gpu_layers
        # llama.cpp may round its context up (to a multiple of 256); llama-cpp-python's own
        # buffers have the size asked for, which is therefore the real limit.
        self.context_length = min(llm.n_ctx(), llm.context_params.n_ctx)
        self.bos_token_id = _opt_int(info.metadata.get("tokenizer.ggml.bos_token_id"))
        eos = {llm.token_eos()}
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = _opt_int(info.metadata.get(key))
            if v is not None and v >= 0:
                eos.add(v)
        self.eos_token_ids = frozenset(eos)
        self.add_bos = bool(info.metadata.get("tokenizer.ggml.add_bos_token", llm._model.add_bos_token()))
        self._piece_cache: dict[int, bytes] = {}

    # ---- facts --------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        md = self._info.metadata
        eos_id = _opt_int(md.get("tokenizer.ggml.eos_token_id"))
        return {
            "name": md.get("general.name") or os.path.basename(self.model_path),
            "architecture": self._info.architecture,
            "context_length": self._info.context_length,
            "chat_template": md.get("tokenizer.chat_template"),
            "bos_token": self._special_text(self.bos_token_id),
            "eos_token": self._special_text(eos_id),
            "file_type": md.get("general.file_type"),
            "n_params": self._info.n_params,
        }

    def _special_text(self, token_id: int | None) -> str | None:
        if token_id is None or token_id < 0:
            return None
        return self._llm._model.token_to_piece(token_id, special=True).rstrip(b"\0").decode("utf-8", "replace")

    # ---- tokens -------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return detokenize_bytes(self, ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text (special tokens add none), cached."""
        b = self._piece_cache.get(token_id)
        if b is None:
            b = self._llm.detokenize([token_id], special=False)
            self._piece_cache[token_id] = b
        return b

    # ---- generation ---------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        return stream_tokens(self, prompt_ids, config, lambda ids, max_new: self._raw_tokens(ids, config))

    def _raw_tokens(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[RawToken]:
        llm = self._llm
        llm.set_seed(config.seed if config.seed is not None else random.getrandbits(31))
        greedy = config.greedy
        it = llm.generate(
            prompt_ids,
            temp=0.0 if greedy else config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
            repeat_penalty=config.repeat_penalty,  # llama.cpp applies penalties before greedy too
            reset=True,
            grammar=self._grammar(config.json_schema) if config.json_schema else None,
        )
        if not config.logprobs:
            for tok in it:
                yield RawToken(tok)
            return
        for tok in it:
            yield RawToken(tok, self._last_logprob(tok))

    def _grammar(self, json_schema: str) -> Any:
        """llama.cpp's own grammar for a JSON schema (its json_schema_to_gbnf), cached by text."""
        cache = self.__dict__.setdefault("_grammars", {})
        if json_schema not in cache:
            from llama_cpp.llama_grammar import LlamaGrammar

            try:
                cache[json_schema] = LlamaGrammar.from_json_schema(json_schema, verbose=False)
            except Exception as e:  # the converter raises ValueError/KeyError/... with the reason
                raise ConfigError(f"json_schema is invalid or unsupported: {e}") from None
        return cache[json_schema]

    def _last_logprob(self, token_id: int) -> float:
        """log softmax of the logits that produced token_id (the last decoded position)."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),))
        m = float(logits.max())
        lse = m + math.log(float(np.exp(logits - m).sum()))
        return float(logits[token_id]) - lse

    def score_tokens(self, ids: Sequence[int]) -> TokenScores:
        """One causal pass over ids with logits kept for every position (in n_batch pieces),
        read row by row, so no (tokens x vocab) array is ever held."""
        import numpy as np

        ids = list(ids)
        logprobs: list[float] = []
        argmax: list[int] = []
        for pos, row in self._logit_rows(ids):
            if pos + 1 >= len(ids):
                continue  # the last position predicts nothing in ids
            row = row.astype(np.float64)
            m = row.max()
            lse = m + np.log(np.exp(row - m).sum())
            logprobs.append(float(row[ids[pos + 1]] - lse))
            argmax.append(int(row.argmax()))
        return TokenScores(logprobs, argmax)

    def logits(self, ids: Sequence[int]) -> Any:
        """float32 numpy (len(ids), V): the raw logits at every position of one causal pass
        from an empty cache, as score_tokens computes them. The cache is cleared afterwards,
        ready to generate."""
        import numpy as np

        ids = list(ids)
        rows = self._logit_rows(ids)
        out = np.empty((len(ids), self._llm.n_vocab()), dtype=np.float32)
        for pos, row in rows:
            out[pos] = row
        return out

    def _logit_rows(self, ids: list[int]) -> Iterator[tuple[int, Any]]:
        """(position, logits row) for every position of one causal pass over ids from an
        empty cache, decoded in n_batch pieces with logits for every position; each row is a
        view of llama.cpp's buffer (llama_get_logits_ith maps a batch position to its output
        row), valid until the next piece. The cache is cleared before and after. Too many ids
        are refused here, before anything is allocated or decoded."""
        check_scorable(len(ids), self.context_length)
        return self._decode_rows(ids)

    def _decode_rows(self, ids: list[int]) -> Iterator[tuple[int, Any]]:
        import llama_cpp
        import numpy as np
        from llama_cpp._internals import LlamaBatch

        llm = self._llm
        llm._ctx.kv_cache_clear()
        llm.reset()
        n_vocab, step = llm.n_vocab(), llm.n_batch
        batch = LlamaBatch(n_tokens=step, embd=0, n_seq_max=1)
        try:
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                batch.set_batch(chunk, n_past=start, logits_all=True)
                llm._ctx.decode(batch)
                for i in range(len(chunk)):
                    yield start + i, np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, i), shape=(n_vocab,))
        finally:
            llm._ctx.kv_cache_clear()  # the next generate starts from a clean cache
            llm.reset()

    def reset(self) -> None:
        """Forget the cached prompt prefix: the next generate evaluates its whole prompt."""
        self._llm.reset()

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def _opt_int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
