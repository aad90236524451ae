"""The Engine protocol, the engine registry and auto-selection.

An engine runs one model on one device. Every engine speaks the same small surface:

    load        EngineClass.load(path, device, **options) -> engine
    tokens      engine.tokenize(text) / engine.detokenize(ids) / engine.token_bytes(id)
    generate    engine.generate(prompt_ids, GenerationConfig) -> Iterator[TokenEvent]

and declares what it can do with `Capabilities`. Engines register themselves with
`@register` (tinygrad/ggml style: a new backend is added by registration, nothing edits a
switch statement); `select_engine` picks one for a model format and a device and keeps the
reason for every engine it passed over, which `hanlin chat --explain` prints.

Stop handling lives here, once, in `apply_stops`: an engine yields raw sampled tokens and
this module turns them into text, stopping on EOS, stop strings (also ones that span token
boundaries) and max_tokens, so every engine stops the same way.

Nothing here imports a vendor library.
"""

from __future__ import annotations

import codecs
import importlib
import json
import math
import os
import pkgutil
from dataclasses import dataclass, field, fields, replace
from typing import (
    Any,
    ClassVar,
    Iterable,
    Iterator,
    Protocol,
    Sequence,
    runtime_checkable,
)

from hanlin.devices import Device

__all__ = [
    "HanlinError",
    "ConfigError",
    "ModelError",
    "DeviceError",
    "ContextOverflowError",
    "EngineUnavailable",
    "GenerationConfig",
    "TokenEvent",
    "Capabilities",
    "Engine",
    "register",
    "registered_engines",
    "get_engine",
    "select_engine",
    "Selection",
    "apply_stops",
    "stream_tokens",
    "check_scorable",
    "detokenize_bytes",
    "check_prompt_fits",
    "detect_format",
    "TokenScores",
    "loglikelihood",
    "perplexity",
    "PerplexityResult",
]


# --------------------------------------------------------------------------------------
# Errors: every error a user can cause is a HanlinError with a message that names what was
# wrong and what would be right. The CLI prints the message, never a traceback.
# --------------------------------------------------------------------------------------


class HanlinError(Exception):
    """Base of every error hanlin raises on purpose."""


class ConfigError(HanlinError, ValueError):
    """A setting is out of range (sampling values, context size, ...)."""


class ModelError(HanlinError):
    """A model is unknown, missing, truncated or corrupt."""


class DeviceError(HanlinError):
    """A requested device does not exist here."""


class ContextOverflowError(HanlinError, ValueError):
    """The prompt does not fit in the context window."""


class EngineUnavailable(HanlinError):
    """The requested engine cannot run here (missing library, wrong device, wrong format)."""


# --------------------------------------------------------------------------------------
# Generation settings and events
# --------------------------------------------------------------------------------------


PENALTY_LAST_N = 64  # llama.cpp's default window for the repeat penalty, used by every engine


@dataclass(frozen=True)
class GenerationConfig:
    """One set of generation settings, shared by every engine, the SDK, the CLI and the server.

    temperature == 0 means greedy decoding (the other sampling settings are then ignored).
    """

    max_tokens: int | None = 512  # None: until EOS or the context is full
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40  # 0 disables
    min_p: float = 0.05  # 0 disables
    repeat_penalty: float = 1.1  # 1.0 disables
    seed: int | None = None  # None: a fresh random seed per call
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # fill TokenEvent.logprob (costs a softmax per token)
    # Constrained decoding: the output must be JSON valid against this JSON Schema, given as
    # JSON text (text keeps the config hashable). '{"type": "object"}' asks for any JSON object.
    json_schema: str | None = None

    def __post_init__(self) -> None:
        # Accept a list or a single string for stop; store a tuple so the config stays hashable.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, rule: str) -> ConfigError:
            return ConfigError(f"{name}={value!r} is invalid: {rule}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "it must be a positive integer (or None for no limit)")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "it must be >= 0 (0 means greedy)")
        if not _finite(self.top_p) or not (0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "it must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "it must be an integer >= 0 (0 disables it)")
        if not _finite(self.min_p) or not (0 <= self.min_p < 1):
            raise bad("min_p", self.min_p, "it must be in [0, 1) (0 disables it)")
        if not _finite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise bad("repeat_penalty", self.repeat_penalty, "it must be > 0 (1.0 disables it)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "it must be an integer from 0 to 2**63 - 1")  # torch's generators take no more
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", s, "stop strings must be non-empty strings")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except (TypeError, ValueError) as e:
                raise bad("json_schema", self.json_schema, f"it must be a JSON Schema as JSON text ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise bad("json_schema", self.json_schema, "a JSON Schema is a JSON object (or true/false)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed; unknown names are an error, None means 'keep'."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {unknown}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class TokenEvent:
    """One step of generation as the caller sees it.

    text is the new text this event adds to the answer: it can be "" (a token that is part of
    a multi-byte character, or text held back because it may start a stop string) and it can
    hold the text of several earlier tokens once it is safe to release. The last event of a
    generation has finish_reason set: "stop" (EOS or a stop string) or "length" (max_tokens or
    the context window).
    """

    text: str
    token_id: int | None
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely (id, logprob) at this step, when asked for


@dataclass(frozen=True)
class RawToken:
    """What an engine's sampler yields before stop handling: the id and its log-probability."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Capabilities:
    formats: frozenset[str]  # model formats it loads: "gguf", "hf", "onnx", "openvino"
    device_kinds: frozenset[str]  # "cpu", "cuda", "npu", "mps"
    streaming: bool = True
    gpu_offload: bool = False  # can place layers on an accelerator
    batching: bool = False  # several sequences in one forward pass
    logprobs: bool = True
    embeddings: bool = False
    grammar: bool = False  # constrained decoding
    trainable: bool = False
    priority: int = 0  # higher wins in auto-selection when several engines fit


# --------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------


@runtime_checkable
class Engine(Protocol):
    """What every engine implements (below), plus optional methods some callers look for:

        logits(ids) -> numpy.ndarray   float32 (len(ids), vocab): the raw logits at every
                                       position after one causal pass from an empty cache,
                                       leaving the engine ready to generate.

    `hanlin quant-report` needs logits() for the KL divergence and top-1 agreement of a
    quantized model against the float one (score_tokens keeps only the target's log-prob);
    an engine without it still gets perplexity and top-1 there, with KL marked n/a. It is
    not a protocol member, so isinstance(engine, Engine) does not require it.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    # Static facts, filled by load()
    model_path: str
    device: Device
    context_length: int  # the context window this engine instance was loaded with
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    add_bos: bool  # whether the model wants BOS in front of a raw prompt

    @classmethod
    def available(cls, device: Device) -> str | None:
        """None when the engine can run on this device here; else the reason it cannot."""

    @classmethod
    def load(cls, path: str, device: Device, **options: Any) -> "Engine": ...

    def metadata(self) -> dict[str, Any]:
        """Model metadata: at least 'chat_template', 'bos_token', 'eos_token', 'name'."""

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        """Stream TokenEvents; the last one has finish_reason set. Implementations sample raw
        tokens and pass them through `apply_stops`."""

    def score_tokens(self, ids: Sequence[int]) -> "TokenScores":
        """Log-probability of each ids[i] given ids[:i] (i >= 1), and the model's argmax there,
        in one causal pass (len(ids) <= context_length)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class TokenScores:
    logprobs: list[float]  # len(ids) - 1 values: log p(ids[i] | ids[:i]) for i = 1..
    argmax: list[int]  # the model's most likely token at each of those positions


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}
_DISCOVERED = False
BROKEN: dict[str, str] = {}  # backend package or plugin -> why it failed to import


def register(cls: type) -> type:
    """Class decorator: make an engine known by its `name`."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(getattr(cls, "capabilities", None), Capabilities):
        raise TypeError(f"{cls!r} needs a `name` and `capabilities` to register as an engine")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every backend package (their __init__ registers without importing vendor
    libraries) and every engine published by other distributions under the
    'hanlin.engines' entry-point group."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import hanlin.backends as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"{pkg.__name__}.{info.name}")
            except Exception as e:  # one broken backend must not take the others down
                BROKEN[info.name] = f"{type(e).__name__}: {e}"
    from importlib.metadata import entry_points

    for ep in entry_points(group="hanlin.engines"):
        try:
            ep.load()
        except Exception as e:
            BROKEN[ep.name] = f"{type(e).__name__}: {e}"


def registered_engines() -> dict[str, type]:
    _discover()
    return dict(_REGISTRY)


def engines_for(device: Device) -> dict[str, str]:
    """Every registered engine -> "ok" when it can run on device, else the reason it cannot
    (what `hanlin devices` and the terminal app's device picker show)."""
    runs = {}
    for name, cls in sorted(registered_engines().items()):
        if device.kind not in cls.capabilities.device_kinds:
            runs[name] = f"does not run on {device.kind}"
        else:
            runs[name] = cls.available(device) or "ok"
    return runs


def get_engine(name: str) -> type:
    engines = registered_engines()
    if name not in engines:
        raise EngineUnavailable(f"unknown engine {name!r}; known engines: {', '.join(sorted(engines)) or 'none'}")
    return engines[name]


# --------------------------------------------------------------------------------------
# Auto-selection: model format + device -> engine, with the reasons kept
# --------------------------------------------------------------------------------------


@dataclass
class Selection:
    engine: type
    device: Device
    reasons: list[str] = field(default_factory=list)  # one line per engine considered

    def explain(self) -> str:
        return "\n".join(self.reasons)


def detect_format(path: str) -> str:
    """The model format of a local path: 'gguf', 'hf', 'onnx', 'openvino' or 'run'."""
    import os

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "hanlin_run.json")):
            return "run"  # a fine-tuning run directory (backends/torch/lora.py)
        # exported folders first: they carry tokenizer files, and may carry a config.json too
        if any(f.endswith(".onnx") for f in os.listdir(path)):
            return "onnx"
        if any(f.endswith(".xml") for f in os.listdir(path)):
            return "openvino"
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise ModelError(
            f"{path} is a folder but not a model: expected config.json (a Hugging Face folder), "
            "an .onnx file or an OpenVINO .xml inside it"
        )
    if not os.path.exists(path):
        raise ModelError(f"model path {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".gguf"):
        return "gguf"  # a bad header; the GGUF engine's validator says exactly what is wrong
    raise ModelError(f"{path}: unknown model format (expected a .gguf file, an .onnx file or a model folder)")


def select_engine(fmt: str, device: Device, requested: str | None = None, path: str | None = None) -> Selection:
    """Pick the engine for a model format on a device.

    With `requested` (a name), that engine is checked and used or refused with its reason.
    Otherwise every registered engine is tried, best priority first. With `path`, engines
    that define `supports(path)` may also refuse a particular model (e.g. an architecture
    the native engine does not build), so the next engine gets it.
    """
    engines = registered_engines()
    reasons: list[str] = []
    if requested and requested != "auto":
        cls = get_engine(requested)
        why = _why_not(cls, fmt, device, path)
        if why:
            raise EngineUnavailable(f"engine {requested!r} cannot run this model here: {why}")
        return Selection(cls, device, [f"{requested}: chosen (--engine {requested})"])

    chosen = None
    for cls in sorted(engines.values(), key=lambda c: -c.capabilities.priority):
        why = _why_not(cls, fmt, device, path)
        if why:
            reasons.append(f"{cls.name}: skipped: {why}")
        elif chosen is None:
            chosen = cls
            reasons.append(f"{cls.name}: chosen: reads {fmt} and runs on {device.kind} (priority {cls.capabilities.priority})")
        else:
            reasons.append(f"{cls.name}: could run it too, lower priority ({cls.capabilities.priority})")
    reasons += [f"{name}: failed to import: {why}" for name, why in BROKEN.items()]
    if chosen is None:
        detail = "; ".join(reasons) or "no engines are registered"
        raise EngineUnavailable(f"no engine can run a {fmt} model on {device.label()}: {detail}")
    return Selection(chosen, device, reasons)


def _why_not(cls: type, fmt: str, device: Device, path: str | None = None) -> str | None:
    caps: Capabilities = cls.capabilities
    if fmt not in caps.formats:
        return f"does not read {fmt} models (reads {', '.join(sorted(caps.formats))})"
    if device.kind not in caps.device_kinds:
        return f"does not run on {device.kind} (runs on {', '.join(sorted(caps.device_kinds))})"
    why = cls.available(device)
    if why is None and path is not None and hasattr(cls, "supports"):
        why = cls.supports(path)
    return why


# --------------------------------------------------------------------------------------
# Shared generation helpers
# --------------------------------------------------------------------------------------


def check_load_options(ctx_size: Any, threads: Any, *, trained: int, default_max: int, device: Any, model: str = "the model's") -> tuple[int, int]:
    """The context size and CPU threads an engine loads with: ctx_size defaults to what the
    model was trained for, capped at default_max; threads to the device's physical cores.
    Bad values are refused with what was asked and what is allowed."""
    if ctx_size is None:
        ctx_size = min(trained, default_max)
    elif not isinstance(ctx_size, int) or isinstance(ctx_size, bool) or ctx_size < 16:
        raise ConfigError(f"ctx_size={ctx_size!r} is invalid: it must be an integer >= 16")
    elif ctx_size > trained:
        raise ConfigError(f"ctx_size={ctx_size} is larger than the {trained} tokens {model} context holds (what it was trained for)")
    if threads is None:
        threads = getattr(device, "physical_cores", None) or os.cpu_count() or 1
    elif not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads={threads!r} is invalid: it must be an integer >= 1")
    return ctx_size, threads


class TokenizerMethods:
    """tokenize / detokenize / token_bytes for an engine whose `self.tok` is one of
    backends/tokenizer.py's tokenizers (the torch, ONNX and OpenVINO engines)."""

    tok: Any

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.tok.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return detokenize_bytes(self, ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tok.token_bytes(token_id)


def check_prompt_fits(n_prompt: int, context_length: int, config: GenerationConfig) -> None:
    """Refuse a prompt that leaves no room to generate, with the numbers."""
    if n_prompt >= context_length:
        raise ContextOverflowError(
            f"the prompt is {n_prompt} tokens but the context window is {context_length} tokens: "
            f"shorten the prompt by at least {n_prompt - context_length + 1} tokens"
            " or load the model with a larger context (--ctx-size)"
        )


def stream_tokens(engine: Any, prompt_ids: Sequence[int], config: GenerationConfig, sample_raw) -> Iterator[TokenEvent]:
    """The shared front of every engine's generate: refuse an empty or too-long prompt, work
    out how many tokens fit, sample with `sample_raw(prompt_ids, max_new)` (an iterator of
    RawToken) and apply the shared stop policy."""
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    check_prompt_fits(len(prompt_ids), engine.context_length, config)
    room = engine.context_length - len(prompt_ids)
    max_new = room if config.max_tokens is None else min(room, config.max_tokens)
    return apply_stops(sample_raw(prompt_ids, max_new), token_bytes=engine.token_bytes, eos_ids=engine.eos_token_ids, config=config, room=room)


def check_scorable(n_tokens: int, context_length: int) -> None:
    if n_tokens > context_length:
        raise ContextOverflowError(f"scoring {n_tokens} tokens needs a context of at least that; this engine has {context_length}")


def detokenize_bytes(engine: Any, ids: Iterable[int]) -> str:
    """Text of token ids from the engine's exact per-token bytes (special tokens add none)."""
    return b"".join(engine.token_bytes(i) for i in ids).decode("utf-8", "replace")


def apply_stops(
    raw: Iterable[RawToken],
    *,
    token_bytes,
    eos_ids: Iterable[int],
    config: GenerationConfig,
    room: int,
) -> Iterator[TokenEvent]:
    """Turn raw sampled tokens into TokenEvents with one shared stop policy (StopPolicy)."""
    policy = StopPolicy(token_bytes=token_bytes, eos_ids=eos_ids, config=config, room=room)
    if policy.limit <= 0:
        yield TokenEvent("", None, None, "length")
        return
    for tok in raw:
        event = policy.feed(tok)
        yield event
        if event.finish_reason:
            return
    yield policy.end()  # the engine ran out of tokens without a reason of its own (its context filled up)


class StopPolicy:
    """The shared stop policy, fed one raw token at a time (a server feeds it as tokens arrive).

    - EOS ids end generation (finish "stop"); the EOS token's text is not emitted.
    - Stop strings end generation (finish "stop") even when they span token boundaries: text
      that could be the start of a stop string is held back until it is known not to be.
      The stop string itself is not emitted.
    - max_tokens, or `room` (tokens left in the context window), ends it with "length".
    - Bytes are decoded incrementally, so a character split over tokens comes out whole.
    """

    def __init__(self, *, token_bytes, eos_ids: Iterable[int], config: GenerationConfig, room: int):
        self.token_bytes = token_bytes
        self.eos = frozenset(eos_ids)
        self.stops = config.stop
        self.limit = room if config.max_tokens is None else min(config.max_tokens, room)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded text not yet released (may be the start of a stop string)
        self.n = 0

    def feed(self, tok: RawToken) -> TokenEvent:
        """The event for one more token; its finish_reason is set when generation ends here."""
        self.n += 1
        if tok.token_id in self.eos:
            tail = self.pending + self.decoder.decode(b"", final=True)
            return TokenEvent(tail, tok.token_id, tok.logprob, "stop", tok.top_logprobs)
        self.pending += self.decoder.decode(self.token_bytes(tok.token_id))
        if self.stops:
            cut = _find_stop(self.pending, self.stops)
            if cut is not None:
                return TokenEvent(self.pending[:cut], tok.token_id, tok.logprob, "stop", tok.top_logprobs)
            keep = _held_back(self.pending, self.stops)
            out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        else:
            out, self.pending = self.pending, ""
        if self.n >= self.limit:
            return TokenEvent(out + self.pending + self.decoder.decode(b"", final=True), tok.token_id, tok.logprob, "length", tok.top_logprobs)
        return TokenEvent(out, tok.token_id, tok.logprob, None, tok.top_logprobs)

    def end(self) -> TokenEvent:
        """The last event when the tokens ran out before a stop (the context filled up)."""
        return TokenEvent(self.pending + self.decoder.decode(b"", final=True), None, None, "length")


def loglikelihood(engine: Any, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether greedy decoding would produce it
    (lm-evaluation-harness's loglikelihood request)."""
    if not continuation:
        raise ConfigError("the continuation is empty")
    ids = list(context) + list(continuation)
    if len(ids) > engine.context_length:
        ids = ids[-engine.context_length :]  # keep the continuation and as much context as fits
    if len(ids) < 2 or len(continuation) >= len(ids):
        raise ContextOverflowError(f"the continuation ({len(continuation)} tokens) leaves no context in a {engine.context_length}-token window")
    sc = engine.score_tokens(ids)
    n = len(continuation)
    tail_lp, tail_arg = sc.logprobs[-n:], sc.argmax[-n:]
    return float(sum(tail_lp)), list(tail_arg) == list(ids[-n:])


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    chunks: int
    ctx: int
    logprobs: list[float]
    argmax: list[int]
    targets: list[int]


def perplexity(engine: Any, ids: Sequence[int], ctx: int, *, bos: int | None = None) -> PerplexityResult:
    """llama.cpp's perplexity: cut ids into chunks of ctx tokens, score the second half of each
    chunk (the first half is context), and average the negative log-likelihood."""
    if ctx < 8 or ctx > engine.context_length:
        raise ConfigError(f"ctx={ctx} is invalid: it must be between 8 and the engine's context of {engine.context_length}")
    ids = list(ids)
    n_chunks = len(ids) // ctx
    if n_chunks == 0:
        raise ConfigError(f"the text is {len(ids)} tokens, shorter than one chunk of {ctx}: use a smaller --ctx or more text")
    lps: list[float] = []
    arg: list[int] = []
    tgt: list[int] = []
    first = ctx // 2
    for c in range(n_chunks):
        chunk = ids[c * ctx : (c + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]  # llama.cpp puts BOS at the start of every chunk
        sc = engine.score_tokens(chunk)
        # sc covers positions 1..ctx-1; score positions first..ctx-1
        lps += sc.logprobs[first - 1 :]
        arg += sc.argmax[first - 1 :]
        tgt += chunk[first:]
    nll = -sum(lps) / len(lps)
    return PerplexityResult(math.exp(nll), len(lps), n_chunks, ctx, lps, arg, tgt)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could be the beginning of a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep
