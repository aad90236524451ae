"""OpenVINOEngine: an exported OpenVINO folder (backends/cpu/openvino_export.py) on OpenVINO's CPU plugin.

How a step runs, and why:
- The IR is the stateful model OpenVINO GenAI builds from a GGUF: inputs input_ids,
  attention_mask, position_ids, beam_idx; the KV cache is the compiled model's internal
  state (ReadValue/Assign pairs), so a decode step feeds one token and copies no cache.
  We drive it with a plain ov.Core compiled model and one infer request, not GenAI's
  LLMPipeline: GenAI samples with its own sampler (its own order of penalty, filters and
  temperature, its own RNG) and returns no per-position logits for scoring, and a hanlin
  setting (and seed) must mean the same thing on every engine.
- Precision is explicit. The CPU plugin silently computes in bf16 on CPUs with
  avx512_bf16/AMX (the project saw logits up to ~9 away from float32's), keeps the KV
  cache in a lower precision by default (the GenAI-built model even asks for f16 in its
  rt_info), and may quantize the activations of int8/int4 matmuls to int8 on the fly
  (DYNAMIC_QUANTIZATION_GROUP_SIZE, 32 by default; on this AVX2 machine without VNNI the
  logits were identical with 0 or 32, so that path is not exercised here). Here INFERENCE_PRECISION_HINT and KV_CACHE_PRECISION are both set from
  `precision` ("f32" unless asked), dynamic activation quantization is off
  (DYNAMIC_QUANTIZATION_GROUP_SIZE=0: the weights are what the quant name says, the
  activations are what `precision` says), the compiled model is asked back what it uses,
  and metadata() reports it. bf16/f16 are accepted only where the Device says the CPU
  computes them natively (devices/cpu.py), else ConfigError.
- At load, a "logits_index" input is spliced in front of the lm_head MatMul (a Gather
  over positions), as the ONNX engine's graph has: generation computes the 49k-wide
  lm_head for the last position only (for a 135M model that matmul is a large part of a
  prefill), scoring for every position. If a model's graph does not end in the expected
  MatMul, the splice is skipped and every position's logits are computed (slower, same
  numbers).
- Multi-turn chat: the state keeps the tokens it holds; a new prompt that extends them
  runs only its new tokens. When it shares only a prefix, the state is cut back to that
  prefix (one copy of each layer's cache, once per generate call); when nothing is shared,
  reset_state(). A continued prefill is a different sequence of matmul shapes than a
  fresh one, so logits can differ in the last float bits (as in llama.cpp).
- Sampling is the shared numpy sampler (sampling.py): llama.cpp's chain and order, seeded
  numpy RNG; stop handling is base.apply_stops. Threads: physical cores, one stream.
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
from hanlin.devices import Device

DEFAULT_MAX_CTX = 4096
META = "hanlin_openvino.json"  # written by openvino_export.py
MODEL_XML = "openvino_model.xml"
# OpenVINO's precision name -> the Device dtype the CPU must compute natively for it
PRECISIONS = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
ALIASES = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16", "float16": "f16", "fp16": "f16"}
SCORE_ROWS = 256  # log-softmax rows at a time when scoring: bounds the float64 copy


@register
class OpenVINOEngine(FolderEngine):
    name: ClassVar[str] = "openvino"
    capabilities: ClassVar[Capabilities] = Capabilities(
        formats=frozenset({"openvino"}),
        device_kinds=frozenset({"cpu"}),
        logprobs=True,
        priority=40,
    )
    meta_file: ClassVar[str] = META
    package: ClassVar[str] = "openvino"

    @classmethod
    def load(
        cls,
        path: str,
        device: Device,
        *,
        ctx_size: int | None = None,
        threads: int | None = None,
        precision: str | None = "f32",
        **_: Any,
    ) -> "OpenVINOEngine":
        meta = _read_meta(path)
        trained = int(meta.get("context_length") or DEFAULT_MAX_CTX)
        ctx_size, threads = check_load_options(ctx_size, threads, trained=trained, default_max=DEFAULT_MAX_CTX, device=device)
        precision = _check_precision(precision, device)

        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(os.path.join(path, MODEL_XML))
        except RuntimeError as e:  # a truncated .bin, a hand-edited .xml, a newer IR version
            raise ModelError(f"OpenVINO cannot read {os.path.join(path, MODEL_XML)}: {_last_line(e)}") from None
        _check_stateful(model, path)
        sliced = _add_logits_index(model)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "KV_CACHE_PRECISION": precision,
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        compiled = core.compile_model(model, "CPU", config)
        _check_compiled_precision(compiled, precision)
        return cls(compiled, meta, path, device, ctx_size, threads, precision, sliced)

    def __init__(self, compiled: Any, meta: dict[str, Any], path: str, device: Device, ctx_size: int, threads: int, precision: str, sliced: bool):
        self._init_folder(path, meta, device, ctx_size, threads)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.precision = precision
        self._inputs = {n for i in compiled.inputs for n in i.get_names()}
        self._sliced = sliced  # whether the graph takes logits_index (else it returns every position)
        self.prompt_tokens_evaluated = 0  # prompt tokens the last generate ran (the rest were cached)

    # ---- facts and tokens -------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return dict(self._folder_metadata(), weights=self._meta.get("weights"), precision=self.precision, kv_cache_precision=self.precision,
                    dynamic_quantization="off", threads=self.threads)  # fmt: skip

    # ---- the forward pass --------------------------------------------------------------

    def _run(self, ids: Sequence[int], all_logits: bool = False):
        """Feed ids after the tokens the state holds; logits (N, V) for the last position or,
        with all_logits, for each of ids. The array is OpenVINO's output buffer: valid until
        the next run."""
        import numpy as np

        start, T = len(self._tokens), len(ids)
        total = start + T
        if total > self.context_length:
            raise ConfigError(f"{total} tokens do not fit the context window of {self.context_length}")
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(start, total, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
        if self._sliced:
            feed["logits_index"] = np.arange(T, dtype=np.int64) if all_logits else np.array([T - 1], np.int64)
        try:
            self.request.infer({k: v for k, v in feed.items() if k in self._inputs})
            self._tokens = self._tokens + list(ids)
        except BaseException:  # an error or Ctrl-C: what the state holds is unknown, so forget it
            self.request.reset_state()
            self._tokens = []
            raise
        out = self.request.get_tensor("logits").data[0]  # (N, V)
        return out if (self._sliced or all_logits) else out[-1:]

    def _keep(self, n: int) -> None:
        """Cut the state back to its first n tokens (0: reset). The cache's sequence axis is
        found by its length; a layout that does not show it is reset instead (correct, slower)."""
        if n >= len(self._tokens):
            return
        if n > 0 and not self._trim_state(n):
            n = 0
        if n == 0:
            self.request.reset_state()
        self._tokens = self._tokens[:n]

    def _trim_state(self, n: int) -> bool:
        import numpy as np
        import openvino as ov

        held = len(self._tokens)
        states = self.request.query_state()
        cut = []
        for s in states:
            t = s.state
            shape = list(t.shape)
            if len(shape) != 4 or shape[2] != held:
                return False
            new = ov.Tensor(t.element_type, ov.Shape(shape[:2] + [n] + shape[3:]))
            np.copyto(new.data, t.data[:, :, :n])
            cut.append(new)
        for s, new in zip(states, cut):
            s.state = new
        return True

    def logits(self, ids: Sequence[int]):
        """float32 numpy (len(ids), V): the raw logits at every position after one causal pass
        from an empty cache (the quant report's KL divergence). The state then holds ids,
        so a generate that extends them reuses it."""
        ids = list(ids)
        if not ids:
            raise ConfigError("logits() needs at least one token")
        check_scorable(len(ids), self.context_length)
        self._keep(0)
        return self._run(ids, all_logits=True).copy()

    def score_tokens(self, ids: Sequence[int]) -> TokenScores:
        import numpy as np
        from hanlin.backends.cpu.sampling import log_softmax

        ids = list(ids)
        if len(ids) < 2:
            raise ConfigError(f"scoring needs at least 2 tokens, got {len(ids)}")
        out = self.logits(ids)[:-1]
        target = np.asarray(ids[1:])
        logprobs: list[float] = []
        for a in range(0, len(out), SCORE_ROWS):
            lps = log_softmax(out[a : a + SCORE_ROWS])
            logprobs += lps[np.arange(len(lps)), target[a : a + SCORE_ROWS]].tolist()
        return TokenScores(logprobs, out.argmax(axis=-1).tolist())

    # ---- generation ---------------------------------------------------------------------

    def _raw(self, prompt: list[int], config: GenerationConfig, max_new: int) -> Iterator[RawToken]:
        from hanlin.backends.cpu.sampling import Sampler

        self._keep(self._cached(prompt))
        reuse = len(self._tokens)  # _keep may have had to reset instead of cutting back
        self.prompt_tokens_evaluated = len(prompt) - reuse
        logits = self._run(prompt[reuse:])[-1]
        sampler = Sampler(config, prompt, PENALTY_LAST_N)
        for i in range(max_new):
            tok, lp = sampler(logits)
            yield RawToken(tok, lp)
            if i + 1 >= max_new or len(self._tokens) >= self.context_length:
                return
            logits = self._run([tok])[-1]

    def reset(self) -> None:
        """Forget the cached prefix: the next generate runs its whole prompt."""
        if self.request is not None:
            self.request.reset_state()
        self._tokens = []

    def close(self) -> None:
        self.request = None
        self.compiled = None
        self._tokens = []


# ---- load helpers -------------------------------------------------------------------------


def _read_meta(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise ModelError(f"{path} is not a folder: the openvino engine loads a folder written by `hanlin export --to openvino`")
    for name in (META, MODEL_XML, "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ModelError(f"{path} has no {name}: export the model again with `hanlin export --to openvino`")
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{os.path.join(path, META)} is not valid JSON: {e}") from None
    if meta.get("format") != "openvino":
        raise ModelError(f"{os.path.join(path, META)} says format={meta.get('format')!r}, not 'openvino'")
    return meta


def _check_precision(precision: str | None, device: Device) -> str:
    """The OpenVINO name of an inference precision this CPU computes natively, or ConfigError."""
    asked = "f32" if precision is None else str(precision).lower()
    name = ALIASES.get(asked, asked)
    supported = [p for p, dtype in PRECISIONS.items() if dtype in device.dtypes]
    if name not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown: use one of {', '.join(PRECISIONS)} (this CPU supports {', '.join(supported)})")
    if name not in supported:
        raise ConfigError(
            f"precision={precision!r} is not supported on {device.label()}: it computes {', '.join(supported)} natively "
            f"({PRECISIONS[name]} needs {'avx512_bf16 or AMX' if name == 'bf16' else 'avx512_fp16 or ARM fp16'})"
        )
    return name


def _check_compiled_precision(compiled: Any, precision: str) -> None:
    """OpenVINO may quietly pick another precision than the one asked for: ask it back."""
    want = PRECISIONS[precision]
    for prop in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION"):
        got = str(compiled.get_property(prop))
        if want not in got and f"'{precision}'" not in got:
            raise ConfigError(f"OpenVINO compiled the model with {prop}={got}, not the {precision} asked for")


def _check_stateful(model: Any, path: str) -> None:
    names = {n for i in model.inputs for n in i.get_names()}
    if "input_ids" not in names or not model.get_sinks():
        raise ModelError(
            f"{os.path.join(path, MODEL_XML)} is not a stateful language model (inputs {sorted(names)}, "
            f"{len(model.get_sinks())} state variables): the engine needs the KV cache inside the model, as OpenVINO GenAI builds it"
        )
    if not any("logits" in o.get_names() for o in model.outputs):
        raise ModelError(f"{os.path.join(path, MODEL_XML)} has no 'logits' output")


def _add_logits_index(model: Any) -> bool:
    """Splice a Gather over positions (new input "logits_index", i64 [N]) in front of the
    lm_head MatMul that feeds the "logits" output; False (model untouched) when the graph
    does not end that way."""
    import openvino as ov
    import openvino.opset13 as ops

    result = next(o for o in model.outputs if "logits" in o.get_names()).get_node()
    node = result.input_value(0).get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul" or node.get_attributes().get("transpose_a"):
        return False
    hidden = node.input_value(0)
    if hidden.get_partial_shape().rank.is_dynamic or hidden.get_partial_shape().rank.get_length() != 3:
        return False
    index = ops.parameter(ov.PartialShape([-1]), ov.Type.i64, name="logits_index")
    index.output(0).set_names({"logits_index"})
    picked = ops.gather(hidden, index, ops.constant(1, ov.Type.i64))  # (B, T, C) -> (B, N, C)
    node.input(0).replace_source_output(picked.output(0))
    model.add_parameters([index])
    model.validate_nodes_and_infer_types()
    return True


def _last_line(e: BaseException) -> str:
    """OpenVINO's exceptions carry a C++ trace; the last non-empty line is the message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
