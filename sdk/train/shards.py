"""Token shards: what `hanlin data prepare` writes and `hanlin train` reads.

A shard folder holds, per split ("train", "heldout"):

    train-00000.bin   token ids of whole documents, each followed by EOS, back to back
                      (uint16 when the vocabulary fits in 16 bits, else uint32)
    train-00000.idx   int64 .npy: the start offset of every document in the .bin, plus its end
    manifest.json     format, dtype, vocab_size, eos_id, the tokenizer file, and for every
                      shard its token and document counts and the sha256 of both files

The .bin is read with numpy.memmap (Megatron's and nanoGPT's layout: no parsing, the page
cache is the reader's buffer). A shard is verified against its sha256 when opened (by
default): a shard that was truncated or corrupted is named, never trained on.

`TokenShards` presents a split as one token stream; training takes fixed windows from it
(GPT-style packing: documents are separated by EOS and attention runs across them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from hanlin.backends.base import ConfigError

FORMAT = "hanlin-shards/1"
MANIFEST = "manifest.json"
TOKENS_PER_SHARD = 1 << 24  # 32 MiB of uint16 per .bin


class ShardError(ConfigError):
    """A shard folder that cannot be trained on: missing, wrong format, or a failed checksum."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class ShardRecord:
    bin: str  # file names, relative to the shard folder
    idx: str
    tokens: int
    docs: int
    sha256: str  # of the .bin
    idx_sha256: str


class ShardWriter:
    """Writes one split's documents into numbered shards. `add` one document's ids at a time
    (EOS is appended here), then `close` and pass the records to `write_manifest`."""

    def __init__(self, out_dir: str, split: str, *, vocab_size: int, eos_id: int, tokens_per_shard: int = TOKENS_PER_SHARD):
        import numpy as np

        if not 0 <= eos_id < vocab_size:
            raise ConfigError(f"eos_id {eos_id} is outside the vocabulary (size {vocab_size})")
        self.out_dir, self.split = out_dir, split
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.dtype = np.dtype(token_dtype(vocab_size))
        self.tokens_per_shard = tokens_per_shard
        self.records: list[ShardRecord] = []
        self._file = None
        self._offsets: list[int] = []
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.records):05d}.bin"
        self._file = open(os.path.join(self.out_dir, name), "wb")
        self._name, self._offsets, self._n = name, [0], 0

    def add(self, ids: Iterable[int]) -> None:
        import numpy as np

        arr = np.fromiter(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ConfigError(f"a token id is outside the vocabulary (size {self.vocab_size})")
        arr = np.append(arr, self.eos_id).astype(self.dtype)
        if self._file is None:
            self._open()
        self._file.write(arr.tobytes())
        self._n += arr.size
        self._offsets.append(self._n)
        if self._n >= self.tokens_per_shard:
            self._finish()

    def _finish(self) -> None:
        import numpy as np

        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        idx = self._name[:-4] + ".idx"
        with open(os.path.join(self.out_dir, idx), "wb") as f:
            np.save(f, np.asarray(self._offsets, dtype=np.int64))
        self.records.append(ShardRecord(
            bin=self._name, idx=idx, tokens=self._n, docs=len(self._offsets) - 1,
            sha256=sha256_file(os.path.join(self.out_dir, self._name)),
            idx_sha256=sha256_file(os.path.join(self.out_dir, idx)),
        ))

    def close(self) -> list[ShardRecord]:
        self._finish()
        return self.records


def write_manifest(out_dir: str, splits: dict[str, list[ShardRecord]], *, vocab_size: int, eos_id: int,
                   tokenizer: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """manifest.json, written to a temp file and renamed."""
    manifest = {
        "format": FORMAT,
        "dtype": token_dtype(vocab_size),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer": tokenizer,
        "splits": {
            name: {
                "tokens": sum(r.tokens for r in recs),
                "docs": sum(r.docs for r in recs),
                "shards": [vars(r) for r in recs],
            }
            for name, recs in splits.items()
        },
        **(extra or {}),
    }
    from hanlin.backends.files import write_text

    path = os.path.join(out_dir, MANIFEST)
    write_text(path, json.dumps(manifest, indent=2))
    return path


def read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{folder} is not a shard folder: it has no {MANIFEST} (make one with `hanlin data prepare`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} cannot be read: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    return manifest


class TokenShards:
    """One split of a shard folder as a single read-only token stream (memory-mapped)."""

    def __init__(self, folder: str, split: str = "train", *, verify: bool = True):
        import numpy as np

        self.folder, self.split = folder, split
        manifest = read_manifest(folder)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise ShardError(f"{folder} has no {split!r} split (it has: {', '.join(sorted(splits)) or 'none'})")
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_id = int(manifest["eos_id"])
        self.tokenizer = manifest.get("tokenizer")
        self.docs = int(splits[split]["docs"])
        dtype = np.dtype(manifest["dtype"])
        self._arrays = []
        for rec in splits[split]["shards"]:
            path = os.path.join(folder, rec["bin"])
            if not os.path.isfile(path):
                raise ShardError(f"shard {rec['bin']} is missing from {folder}")
            if os.path.getsize(path) != rec["tokens"] * dtype.itemsize:
                raise ShardError(f"shard {rec['bin']} has {os.path.getsize(path)} bytes; the manifest says "
                                 f"{rec['tokens']} tokens ({rec['tokens'] * dtype.itemsize} bytes)")
            if verify and sha256_file(path) != rec["sha256"]:
                raise ShardError(f"shard {rec['bin']} fails its checksum (sha256 differs from the manifest): "
                                 "it was changed or corrupted after `hanlin data prepare` wrote it")
            self._arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])  # (S+1,) stream offset of each shard
        self.tokens = int(self._starts[-1])

    def __len__(self) -> int:
        return self.tokens

    def window(self, start: int, length: int):
        """tokens[start : start + length] of the split's stream as int64 (may span shards)."""
        import numpy as np

        if start < 0 or start + length > self.tokens:
            raise IndexError(f"window [{start}, {start + length}) is outside the {self.tokens}-token stream")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, filled = start - int(self._starts[i]), 0
        while filled < length:
            piece = self._arrays[i][pos: pos + length - filled]
            out[filled: filled + piece.size] = piece
            filled += piece.size
            i, pos = i + 1, 0
        return out
