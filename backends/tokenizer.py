"""The two tokenizers every engine shares, so that every engine sees the same ids:

- a GGUF file uses llama.cpp's own tokenizer, loaded vocab-only (no weights): the ids are
  llama.cpp's by construction;
- a Hugging Face folder (and an exported ONNX/OpenVINO folder, which carries the same files)
  uses tokenizer.json through the `tokenizers` library, the same tokenizer transformers uses.

Both give exact per-token bytes, which the shared stop policy (base.apply_stops) decodes.
"""

from __future__ import annotations

import json
import os

from hanlin.backends.base import ModelError

__all__ = ["LlamaCppTokenizer", "HFTokenizer"]


class LlamaCppTokenizer:
    """llama.cpp's tokenizer for a GGUF file, loaded without weights (vocab_only)."""

    def __init__(self, path: str):
        try:
            import llama_cpp
        except ImportError:
            raise ModelError("reading a GGUF file's tokenizer needs llama-cpp-python (pip install 'hanlin[gguf]')") from None
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs from C even when verbose=False
            self._llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        self.add_bos = bool(self._llm._model.add_bos_token())
        self.eos_ids = frozenset({self._llm.token_eos()})
        self.vocab_size = self._llm.n_vocab()
        self._cache: dict[int, bytes] = {}

    def encode(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._llm.detokenize([token_id], special=False)
        return b

    def special_text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        return self._llm._model.token_to_piece(token_id, special=True).rstrip(b"\0").decode("utf-8", "replace")


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-ins for the 256 byte values, reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return {c: b for b, c in enumerate(chars)}


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library, with exact per-token bytes."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelError(f"{folder} has no tokenizer.json")
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        decoder = json.dumps(spec.get("decoder") or {})
        self._byte_level = '"ByteLevel"' in decoder
        self._special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.isfile(cfg_path) else {}
        self.add_bos = bool(cfg.get("add_bos_token", False))
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eos_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None
        self.eos_ids = frozenset({eos_id} if eos_id is not None else ())
        self._bytes = _byte_decoder() if self._byte_level else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._cache: dict[int, bytes] = {}

    def encode(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def token_bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is not None:
            return b
        piece = self._tok.id_to_token(token_id) or ""
        if token_id in self._special:
            b = b""
        elif self._bytes is not None:
            b = bytes(self._bytes[c] for c in piece if c in self._bytes)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            b = bytes([int(piece[3:5], 16)])  # sentencepiece byte fallback
        else:
            b = piece.replace("▁", " ").encode("utf-8")
        self._cache[token_id] = b
        return b


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_tokenizer_files(source: str, out_dir: str) -> list[str]:
    """Write the tokenizer of `source` (a GGUF file or a Hugging Face folder) into out_dir as
    tokenizer.json + tokenizer_config.json (+ chat_template.jinja): what HFTokenizer and
    hf_meta.load_folder_template read, so an exported ONNX or OpenVINO folder tokenizes with
    the same ids as the model it came from.

    A folder's files are copied as they are. A GGUF's tokenizer is converted by transformers'
    GGUF reader (the same converter `from_pretrained(gguf_file=...)` uses); its ids were
    checked equal to llama.cpp's on WikiText-2 and the chat markers (tests/test_onnx_engine.py).
    """
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            raise ModelError(f"{source} has no tokenizer.json to copy")
        copied = []
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(out_dir, name))
                copied.append(name)
        return copied
    try:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelError("converting a GGUF file's tokenizer needs transformers (pip install transformers)") from None
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(source)), gguf_file=os.path.basename(source))
    tok.save_pretrained(out_dir)
    return sorted(n for n in os.listdir(out_dir) if n in TOKENIZER_FILES)
