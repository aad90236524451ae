"""What the ONNX Runtime and OpenVINO engines share: a folder written by `hanlin export`
(the model, tokenizer.json, the chat template and a small JSON of facts), read the same way,
and the same generation front (no constrained decoding, prefix reuse, the numpy sampler)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Iterator, Sequence

from hanlin.backends.base import (
    ConfigError,
    GenerationConfig,
    TokenEvent,
    TokenizerMethods,
    stream_tokens,
)
from hanlin.devices import Device
from hanlin.devices.tools import installed


class FolderEngine(TokenizerMethods):
    name: ClassVar[str]
    meta_file: ClassVar[str]  # the JSON `hanlin export` writes into the folder
    package: ClassVar[str]  # the runtime's Python package
    context_length: int
    _tokens: list[int]  # what the engine's KV cache holds, for prefix reuse

    @classmethod
    def available(cls, device: Device) -> str | None:
        if not installed(cls.package):
            return f"{cls.package} not installed (pip install -c constraints.txt 'hanlin[cpu]')"
        return None

    @classmethod
    def supports(cls, path: str) -> str | None:
        if not os.path.isfile(os.path.join(path, cls.meta_file)):
            return f"{path} has no {cls.meta_file}: this engine runs folders written by `hanlin export --to {cls.name}`"
        return None

    def _init_folder(self, path: str, meta: dict[str, Any], device: Device, ctx_size: int, threads: int) -> None:
        from hanlin.backends.hf_meta import load_folder_template
        from hanlin.backends.tokenizer import HFTokenizer

        self._meta = meta
        self.model_path = path
        self.device = device
        self.context_length = ctx_size
        self.threads = threads
        self.tok = HFTokenizer(path)
        self._template, self._bos_text, self._eos_text = load_folder_template(path)
        eos = meta.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = frozenset(int(e) for e in eos if e is not None) | self.tok.eos_ids
        self.bos_token_id = meta.get("bos_token_id")
        self.add_bos = self.tok.add_bos
        self._tokens = []

    def _folder_metadata(self) -> dict[str, Any]:
        m = self._meta
        return {"chat_template": self._template, "bos_token": self._bos_text, "eos_token": self._eos_text,
                "name": m.get("name") or os.path.basename(self.model_path.rstrip("/")), "architecture": m.get("architecture"),
                "context_length": m.get("context_length"), "quant": m.get("quant")}  # fmt: skip

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        if config.json_schema:
            raise ConfigError(f"the {self.name} engine has no constrained decoding: use the torch or gguf engine for json_schema")
        return stream_tokens(self, prompt_ids, config, lambda ids, max_new: self._raw(ids, config, max_new))

    def _raw(self, prompt: list[int], config: GenerationConfig, max_new: int) -> Iterator[Any]:
        raise NotImplementedError

    def _cached(self, prompt: Sequence[int]) -> int:
        """How many of the prompt's first tokens the cache holds already (never the last one:
        at least one token must run to give logits)."""
        n = 0
        for a, b in zip(self._tokens, prompt[:-1]):
            if a != b:
                break
            n += 1
        return n
