"""OnnxEngine: an exported ONNX folder (backends/cpu/onnx_export.py) on ONNX Runtime's CPU provider.

How a step runs, and why:
- One preallocated (1, K, ctx, D) float32 buffer per layer for keys and one for values, bound
  with I/O binding as both the graph's past_* input and its present_* output. The graph's
  GroupQueryAttention writes the new rows into that memory itself, so a decode step copies
  nothing but the new token's keys and values (a Concat-based cache would copy the whole
  cache of every layer every step).
- The prompt runs in one pass; a new prompt that extends the previous one (a multi-turn chat)
  only runs its new tokens: the buffer already holds the rest.
- logits_index picks where logits are computed: the last position while generating (the
  49k x C lm_head is the biggest matmul of a small model: running it for every prompt token
  would waste most of a prefill), every position when scoring.
- Sampling is the shared numpy sampler (sampling.py): llama.cpp's chain and order. Stop
  handling is base.apply_stops.

Why not onnxruntime-genai's loop: it runs a folder like this one given its genai_config.json,
but it samples with its own sampler (no min-p, no llama.cpp repeat penalty), returns no
per-position logits for scoring, and its Python package pins its own onnxruntime build; a
hundred lines of our own loop over the same shared-buffer graph keeps every setting meaning
the same thing on every hanlin engine.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar, Iterator, Sequence

from hanlin.backends.base import (
    PENALTY_LAST_N,
    Capabilities,
    ConfigError,
    GenerationConfig,
    ModelError,
    RawToken,
    TokenScores,
    check_load_options,
    check_scorable,
    register,
)
from hanlin.backends.cpu.folder import FolderEngine
from hanlin.backends.hugepages import HugePages
from hanlin.backends.hugepages import huge_pages as on_huge_pages
from hanlin.devices import Device

DEFAULT_MAX_CTX = 4096
META = "hanlin_onnx.json"


@register
class OnnxEngine(FolderEngine):
    name: ClassVar[str] = "onnx"
    capabilities: ClassVar[Capabilities] = Capabilities(
        formats=frozenset({"onnx"}),
        device_kinds=frozenset({"cpu"}),
        logprobs=True,
        priority=40,
    )
    meta_file: ClassVar[str] = META
    package: ClassVar[str] = "onnxruntime"

    @classmethod
    def load(cls, path: str, device: Device, *, ctx_size: int | None = None, threads: int | None = None, huge_pages: bool = True,
             **_: Any) -> "OnnxEngine":  # fmt: skip
        why = cls.supports(path)
        if why:
            raise ModelError(why)
        with open(os.path.join(path, META), encoding="utf-8") as f:
            meta = json.load(f)
        ctx_size, threads = check_load_options(ctx_size, threads, trained=int(meta["context_length"]), default_max=DEFAULT_MAX_CTX, device=device)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
        # the packed weights and the cache on 2 MiB pages (backends/hugepages.py): the default
        # model's int4 export decoded 136.2 -> 149.2 and 119.1 -> 136.0 tok/s (two runs of
        # tools/bench_decode.py --small-pages) for ~1.2 s more load time (the pages are moved
        # once) and ~57 MB more peak RSS; HANLIN_HUGE_PAGES=0 or huge_pages=False: not
        with on_huge_pages(huge_pages) as pages:
            session = ort.InferenceSession(os.path.join(path, "model.onnx"), opts, providers=["CPUExecutionProvider"])
            engine = cls(session, meta, path, device, ctx_size, threads)
        engine.huge_pages = pages
        return engine

    def __init__(self, session: Any, meta: dict[str, Any], path: str, device: Device, ctx_size: int, threads: int):
        import numpy as np
        import onnxruntime as ort

        self._init_folder(path, meta, device, ctx_size, threads)
        self.session = session
        self.huge_pages = HugePages(reason="not asked for")  # load() fills it in
        shape = (1, meta["n_kv_heads"], ctx_size, meta["head_dim"])
        self._buffers = [np.zeros(shape, np.float32) for _ in range(2 * meta["n_layers"])]  # held: the OrtValues point into them
        self._cache = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        self._names = [f"{kv}.{i}" for i in range(meta["n_layers"]) for kv in ("key", "value")]
        # one binding for the engine's life: the cache is bound once, each step rebinds its inputs
        self._io = session.io_binding()
        self._io.bind_output("logits")  # first: get_outputs() lists outputs in binding order
        # logits at one position (every decode step) land in this buffer: reading them back by
        # get_outputs() wrapped all 2 x layers + 1 outputs each step (~0.25 ms, 2-3% of a step)
        self._one = np.empty((1, 1, meta["vocab_size"]), np.float32)
        self._one_ort = ort.OrtValue.ortvalue_from_numpy(self._one)
        for name, value in zip(self._names, self._cache):
            self._io.bind_ortvalue_input(f"past_{name}", value)
            self._io.bind_ortvalue_output(f"present_{name}", value)  # the same memory: written in place

    # ---- facts and tokens -------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        out = dict(self._folder_metadata(), precision="float32", **self.huge_pages.as_dict())
        if self._meta.get("calibration"):  # int4: GPTQ's calibration text
            out["calibration"] = self._meta["calibration"]
        return out

    # ---- the forward pass --------------------------------------------------------------

    def _run(self, ids: Sequence[int], start: int, all_logits: bool = False):
        """Run ids at cache slots [start, start + len(ids)); logits (N, V) for the last position
        or, with all_logits, for every one. The cache then holds start + len(ids) tokens."""
        import numpy as np

        T, total = len(ids), start + len(ids)
        if total > self.context_length:
            raise ConfigError(f"{total} tokens do not fit the context window of {self.context_length}")
        io = self._io
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input("logits_index", np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], np.int64))
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        one = T == 1 or not all_logits
        if one:
            io.bind_ortvalue_output("logits", self._one_ort)
        else:
            io.bind_output("logits")  # allocated by the run: (1, T, V)
        self.session.run_with_iobinding(io)
        self._tokens = self._tokens[:start] + list(ids)
        return self._one[0].copy() if one else io.get_outputs()[0].numpy()[0]

    def logits(self, ids: Sequence[int]):
        """float32 (len(ids), V): the logits at every position of one causal pass."""
        ids = list(ids)
        check_scorable(len(ids), self.context_length)
        return self._run(ids, 0, all_logits=True)

    def score_tokens(self, ids: Sequence[int]) -> TokenScores:
        from hanlin.backends.cpu.sampling import log_softmax

        ids = list(ids)
        lps = log_softmax(self.logits(ids)[:-1])
        target = ids[1:]
        return TokenScores([float(lps[i, t]) for i, t in enumerate(target)], lps.argmax(axis=-1).tolist())

    # ---- generation ---------------------------------------------------------------------

    def _raw(self, prompt: list[int], config: GenerationConfig, max_new: int) -> Iterator[RawToken]:
        from hanlin.backends.cpu.sampling import Sampler

        reuse = self._cached(prompt)
        logits = self._run(prompt[reuse:], reuse)[-1]
        sampler = Sampler(config, prompt, PENALTY_LAST_N)
        for i in range(max_new):
            tok, lp = sampler(logits)
            yield RawToken(tok, lp)
            if i + 1 >= max_new or len(self._tokens) >= self.context_length:
                return
            logits = self._run([tok], len(self._tokens))[-1]

    def reset(self) -> None:
        self._tokens = []

    def close(self) -> None:
        self.session = self._io = None
        self._cache = []
        self._buffers = []
