"""`hanlin.load` and the LLM object: the user's API for chat and generation.

    llm = hanlin.load()                                  # the default model, best device/engine
    print(llm.chat([{"role": "user", "content": "Hi"}]).text)
    for piece in llm.chat(messages, stream=True): print(piece.text, end="")
    llm.generate("Once upon a time", max_tokens=20, temperature=0)

Messages become token ids here, once (chat_template.render, then the engine's tokenizer),
so every engine is handed the same ids for the same messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from hanlin.backends.base import (
    ConfigError,
    DeviceError,
    GenerationConfig,
    Selection,
    TokenEvent,
    select_engine,
)
from hanlin.catalog import DEFAULT_MODEL, ModelNotPulled, ResolvedModel, pull, resolve
from hanlin.chat_template import CHATML_TEMPLATE, render
from hanlin.devices import Device, DeviceNotFound, detect, get_device

Message = Mapping[str, Any]


@dataclass
class Completion:
    """The result of one chat or generate call."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    time_to_first_token: float = 0.0  # seconds, prefill included
    decode_seconds: float = 0.0  # after the first token

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "timings": {
                "time_to_first_token_s": round(self.time_to_first_token, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_second, 2),
            },
        }


class Stream:
    """Iterate TokenEvents as they are generated; `.completion` holds the total at the end.

    `close()` (or leaving a `with` block, or breaking out and dropping it) stops generation:
    the engine stops at the next token, and `.completion` has what was produced so far with
    finish_reason "cancelled".
    """

    def __init__(self, events: Iterator[TokenEvent], prompt_tokens: int, want_logprobs: bool):
        self._events = events
        self._t0 = time.perf_counter()
        self._t_first: float | None = None
        self._text: list[str] = []
        self._ids: list[int] = []
        self._lps: list[float] | None = [] if want_logprobs else None
        self._finish: str | None = None
        self._prompt_tokens = prompt_tokens

    def __iter__(self) -> Iterator[TokenEvent]:
        for ev in self._events:
            if self._t_first is None:
                self._t_first = time.perf_counter()
            if ev.token_id is not None:  # every sampled token counts, EOS included
                self._ids.append(ev.token_id)
                if self._lps is not None and ev.logprob is not None:
                    self._lps.append(ev.logprob)
            self._text.append(ev.text)
            if ev.finish_reason:
                self._finish = ev.finish_reason
            yield ev
        self._t_end = time.perf_counter()

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close:
            close()
        if self._finish is None:
            self._finish = "cancelled"

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def completion(self) -> Completion:
        end = getattr(self, "_t_end", time.perf_counter())
        first = self._t_first if self._t_first is not None else end
        return Completion(
            text="".join(self._text),
            finish_reason=self._finish or "cancelled",
            prompt_tokens=self._prompt_tokens,
            completion_tokens=len(self._ids),
            token_ids=list(self._ids),
            logprobs=self._lps,
            time_to_first_token=first - self._t0,
            decode_seconds=end - first,
        )


class LLM:
    """A loaded model on one device with one engine."""

    def __init__(self, engine: Any, model: ResolvedModel, selection: Selection, config: GenerationConfig):
        self.engine = engine
        self.model = model
        self.selection = selection
        self.config = config
        md = engine.metadata()
        self._template = md.get("chat_template")
        self.template_is_fallback = not self._template
        if not self._template:
            self._template = CHATML_TEMPLATE
        self._bos = md.get("bos_token")
        self._eos = md.get("eos_token")
        self.metadata = md

    # ---- facts --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def device(self) -> Device:
        return self.engine.device

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def explain(self) -> str:
        return self.selection.explain()

    @property
    def template_reads_tools(self) -> bool:
        """Whether the model's chat template renders a `tools` list (Qwen2.5, Llama 3.1 ...)."""
        return "tools" in (self._template or "")

    # ---- prompts ------------------------------------------------------------------------

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text the model's own chat template makes of these messages."""
        return render(
            self._template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._bos, eos_token=self._eos, **extra,
        )  # fmt: skip

    def chat_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Token ids for these messages: what every engine is given."""
        ids = self.engine.tokenize(self.render(messages, add_generation_prompt=add_generation_prompt, **extra), add_bos=False, special=True)
        bos = self.engine.bos_token_id
        if self.engine.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids  # the model wants BOS and its template did not write one
        return ids

    def tokenize(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return self.engine.tokenize(text, add_bos=self.engine.add_bos if add_bos is None else add_bos, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.engine.detokenize(ids)

    # ---- generation ---------------------------------------------------------------------

    def chat(self, messages: Sequence[Message], *, stream: bool = False, config: GenerationConfig | None = None, **overrides: Any):
        """Answer a chat history. Returns a Completion, or a Stream of TokenEvents when stream=True."""
        return self.generate_ids(self.chat_ids(messages), stream=stream, config=config, **overrides)

    def generate(self, prompt: str, *, stream: bool = False, config: GenerationConfig | None = None, **overrides: Any):
        """Continue raw text (no chat template)."""
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, not {type(prompt).__name__}")
        return self.generate_ids(self.tokenize(prompt), stream=stream, config=config, **overrides)

    def generate_ids(self, ids: Sequence[int], *, stream: bool = False, config: GenerationConfig | None = None, **overrides: Any):
        cfg = (config or self.config).updated(**overrides) if overrides else (config or self.config)
        s = Stream(self.engine.generate(ids, cfg), len(ids), cfg.logprobs)
        if stream:
            return s
        for _ in s:
            pass
        return s.completion

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load(
    model: str = DEFAULT_MODEL,
    *,
    device: str | Device = "auto",
    engine: str = "auto",
    config: GenerationConfig | None = None,
    pull_missing: bool = False,
    **engine_options: Any,
) -> LLM:
    """Load a model (catalogue name or path) on a device with an engine.

    device: "auto" (the best accelerator an engine can use, else the CPU), "cpu", "cuda",
    "cuda:1", "npu:0", "mps", or a Device. engine: "auto" or a registered engine name
    ("gguf", ...). pull_missing: fetch a catalogue model that is not here yet (the CLI does;
    the SDK does not download behind your back unless asked). engine_options go to the
    engine's load (ctx_size, threads, gpu_layers, ...).
    """
    try:
        resolved = resolve(model)
    except ModelNotPulled as e:
        if not pull_missing:
            raise
        pull(e.entry.name)
        resolved = resolve(model)
    selection = _choose(resolved.format, device, engine, resolved.path)
    eng = selection.engine.load(resolved.path, selection.device, **engine_options)
    return LLM(eng, resolved, selection, config or GenerationConfig())


def _choose(fmt: str, device: str | Device, engine: str, path: str | None = None) -> Selection:
    if isinstance(device, Device):
        return select_engine(fmt, device, engine, path)
    if device != "auto":
        try:
            dev = get_device(device)
        except DeviceNotFound as e:
            raise DeviceError(str(e)) from None
        return select_engine(fmt, dev, engine, path)
    # auto: try the accelerators first, then the CPU; keep every reason for --explain
    report = detect()
    reasons: list[str] = [f"device {kind}: none ({why})" for kind, why in report.notes.items()]
    last_error: Exception | None = None
    for dev in sorted(report.devices, key=lambda d: d.kind == "cpu"):
        try:
            sel = select_engine(fmt, dev, engine, path)
        except Exception as e:  # EngineUnavailable: try the next device
            reasons.append(f"device {dev.spec()}: {e}")
            last_error = e
            continue
        sel.reasons = reasons + [f"device {dev.spec()}: {dev.label()}"] + sel.reasons
        return sel
    assert last_error is not None
    raise last_error
