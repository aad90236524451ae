"""Read and check a GGUF file with the standard library alone.

llama.cpp can abort the whole process on a truncated or corrupt .gguf, so hanlin reads the
header, the metadata table and the tensor table itself, and checks that every tensor's data
lies inside the file, before llama.cpp opens it. The same pass gives the metadata hanlin
needs (architecture, context length, chat template, special token ids) on a phone that has
neither the `gguf` package nor numpy.

The layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x   (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets are relative to here)

A string is a u64 length and that many UTF-8 bytes; an array is a u32 element type, a u64
count and the elements.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from hanlin.backends.base import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 24

# value type id -> (struct format, size); 8 = string and 9 = array are handled apart
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
STRING, ARRAY = 8, 9

# ggml type id -> (name, elements per block, bytes per block); from ggml.h / ggml.c
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# Arrays that are big and not needed to chat (the tokenizer's own tables): skipped but
# walked, so a truncated file is still caught, unless read_arrays=True.
_BIG_ARRAY_MIN = 1024


@dataclass(frozen=True)
class ArraySummary:
    """An array value that was walked but not kept (see read_arrays)."""

    type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the fastest-moving dimension
    ggml_type: int
    type_name: str
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFInfo:
    path: str
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    tokens: list[str] | None = None  # tokenizer.ggml.tokens, when asked for

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def context_length(self) -> int | None:
        v = self.metadata.get(f"{self.architecture}.context_length")
        return int(v) if isinstance(v, int) else None

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def bos_token_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.eos_token_id")

    @property
    def name(self) -> str:
        return self.metadata.get("general.name") or os.path.basename(self.path)

    @property
    def file_type(self) -> int | None:
        return self.metadata.get("general.file_type")

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def data_end(self) -> int:
        return max((t.offset + t.nbytes for t in self.tensors), default=self.data_offset)


class _Truncated(Exception):
    """The file ended while reading `what` at `pos`."""

    def __init__(self, pos: int, need: int):
        self.pos, self.need = pos, need


class _Reader:
    """A cursor over the file's bytes (memory-mapped), with bounds checks on every read."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.size:
            raise _Truncated(self.pos, n)
        b = self.buf[self.pos : end]
        self.pos = end
        return b

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.pos, n)
        self.pos += n

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        if n > self.size - self.pos:
            raise _Truncated(self.pos, n)
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.skip(self.u64())


def _hint(head: bytes) -> str:
    if not head:
        return "the file is empty"
    if head[:2] == b"PK":
        return "this looks like a zip archive (a wheel or a PyTorch .bin?), not a GGUF file"
    if head.lstrip()[:1] == b"<":
        return "this looks like an HTML/XML page (a failed download?), not a GGUF file"
    if len(head) >= 9 and head[8:9] == b"{":
        return "this looks like a safetensors file; use the model folder with a torch engine"
    if head.lstrip()[:1] in (b"{", b"["):
        return "this looks like a JSON file, not a GGUF file"
    if head[:4] == b"ggjt" or head[:4] == b"ggml" or head[:4] == b"tjgg":
        return "this is an old GGML-era file; convert it to GGUF with llama.cpp's convert scripts"
    return f"it starts with {head[:8]!r} instead of b'GGUF'"


def read_gguf(path: str, *, read_arrays: bool = False, tokens: bool = False) -> GGUFInfo:
    """Read the header, metadata and tensor table of a GGUF file; raise ModelError if bad.

    read_arrays: keep every array value (big tokenizer tables included). Otherwise arrays of
    1024+ elements are walked (so a truncated one is caught) and stored as ArraySummary.
    tokens: also keep tokenizer.ggml.tokens as GGUFInfo.tokens.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a folder, not a .gguf file") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    with f:
        if size < 24:
            head = f.read(8)
            if head[:4] != MAGIC:
                raise ModelError(f"{path} is not a GGUF file: {_hint(head)}")
            raise ModelError(
                f"{path} is truncated: the file is {size} bytes, shorter than the 24-byte GGUF header; "
                "the download is incomplete, fetch it again (e.g. `hanlin pull NAME --force`)"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(path, mm, size, read_arrays=read_arrays, want_tokens=tokens)


def _parse(path: str, buf: Any, size: int, *, read_arrays: bool, want_tokens: bool) -> GGUFInfo:
    r = _Reader(buf, size)
    head = bytes(buf[:16])
    if head[:4] != MAGIC:
        raise ModelError(f"{path} is not a GGUF file: {_hint(head)}")
    r.skip(4)
    version = r.u32()
    if version == 1:
        raise ModelError(f"{path} is GGUF version 1, which is not supported; re-convert it with a current llama.cpp")
    if version not in (2, 3):
        raise ModelError(f"{path} has GGUF version {version}; this reader knows versions 2 and 3 (is the file corrupt?)")
    n_tensors, n_kv = r.u64(), r.u64()
    # Counts no real model has (and more entries than the file could hold: a KV needs >= 13
    # bytes, a tensor info >= 29) mean a corrupt header; plausible counts in a short file are
    # a truncation, which the walk below reports at the exact place the file ends.
    if (n_kv > MAX_KV and n_kv * 13 > size) or (n_tensors > MAX_TENSORS and n_tensors * 29 > size):
        raise ModelError(
            f"{path} is corrupt: its header claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than a {size}-byte file can hold"
        )
    info = GGUFInfo(path=path, version=version, file_size=size, alignment=DEFAULT_ALIGNMENT, data_offset=0)
    where = "the metadata table"
    try:
        for i in range(n_kv):
            where = f"metadata entry {i + 1} of {n_kv}"
            key = r.string()
            vtype = r.u32()
            where = f"metadata entry {i + 1} of {n_kv} ({key!r})"
            keep_all = read_arrays or (want_tokens and key == "tokenizer.ggml.tokens")
            info.metadata[key] = _value(r, vtype, path, key, keep_all)
        if want_tokens and isinstance(info.metadata.get("tokenizer.ggml.tokens"), list):
            info.tokens = info.metadata["tokenizer.ggml.tokens"]
            if not read_arrays:
                info.metadata["tokenizer.ggml.tokens"] = ArraySummary(STRING, len(info.tokens))
        alignment = info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelError(f"{path} is corrupt: general.alignment is {alignment!r}, expected a power of two")
        info.alignment = alignment
        raw_tensors = []
        for i in range(n_tensors):
            where = f"tensor info {i + 1} of {n_tensors}"
            name = r.string()
            n_dims = r.u32()
            if n_dims == 0 or n_dims > MAX_DIMS:
                raise ModelError(f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            shape = tuple(r.u64() for _ in range(n_dims))
            ggml_type = r.u32()
            offset = r.u64()
            raw_tensors.append((name, shape, ggml_type, offset))
    except _Truncated as t:
        raise ModelError(
            f"{path} is truncated: the file ends at byte {size} while reading {where} "
            f"(needed {t.need} bytes at byte {t.pos}); the download is incomplete, fetch it again"
        ) from None
    data_offset = -(-r.pos // info.alignment) * info.alignment
    info.data_offset = data_offset
    seen: set[str] = set()
    for name, shape, ggml_type, rel in raw_tensors:
        if name in seen:
            raise ModelError(f"{path} is corrupt: tensor {name!r} appears twice in the tensor table")
        seen.add(name)
        if ggml_type not in GGML_TYPES:
            raise ModelError(
                f"{path}: tensor {name!r} has ggml type {ggml_type}, which this reader does not know "
                "(a newer quantization, or a corrupt file)"
            )
        type_name, block, type_size = GGML_TYPES[ggml_type]
        n = 1
        for d in shape:
            n *= d
        if n == 0 or shape[0] % block:
            raise ModelError(f"{path} is corrupt: tensor {name!r} has shape {list(shape)}, not a whole number of {type_name} blocks of {block}")
        if rel % info.alignment:
            raise ModelError(f"{path} is corrupt: tensor {name!r} starts at data offset {rel}, not a multiple of the alignment {info.alignment}")
        info.tensors.append(TensorInfo(name, shape, ggml_type, type_name, data_offset + rel, n // block * type_size))
    _check_ranges(info)
    return info


def _value(r: _Reader, vtype: int, path: str, key: str, keep_all: bool) -> Any:
    if vtype in _SCALARS:
        fmt, n = _SCALARS[vtype]
        return struct.unpack(fmt, r.take(n))[0]
    if vtype == STRING:
        return r.string()
    if vtype == ARRAY:
        etype = r.u32()
        count = r.u64()
        if etype == ARRAY:
            raise ModelError(f"{path} is corrupt: metadata {key!r} is an array of arrays")
        if etype in _SCALARS:
            fmt, n = _SCALARS[etype]
            if count * n > r.size - r.pos:
                raise _Truncated(r.pos, count * n)
            if keep_all or count < _BIG_ARRAY_MIN:
                return list(struct.unpack(f"<{count}{fmt[1]}", r.take(count * n)))
            r.skip(count * n)
            return ArraySummary(etype, count)
        if etype == STRING:
            if count * 8 > r.size - r.pos:
                raise _Truncated(r.pos, count * 8)
            if keep_all or count < _BIG_ARRAY_MIN:
                return [r.string() for _ in range(count)]
            for _ in range(count):
                r.skip_string()
            return ArraySummary(etype, count)
        raise ModelError(f"{path} is corrupt: metadata {key!r} is an array of unknown type {etype}")
    raise ModelError(f"{path} is corrupt: metadata {key!r} has unknown value type {vtype}")


def _check_ranges(info: GGUFInfo) -> None:
    """Every tensor's bytes must lie inside the file and not overlap another's."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in info.tensors)
    need = max((end for _, end, _ in spans), default=info.data_offset)
    for start, end, name in spans:
        if end > info.file_size:
            raise ModelError(
                f"{info.path} is truncated: tensor {name!r} needs bytes [{start}, {end}) but the file is only "
                f"{info.file_size} bytes; the download is incomplete (expected at least {need} bytes), fetch it again"
            )
    for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise ModelError(f"{info.path} is corrupt: tensors {n1!r} and {n2!r} overlap (bytes {s2} to {e1})")


def validate_gguf(path: str) -> GGUFInfo:
    """read_gguf, for the purpose of refusing a bad file before llama.cpp opens it."""
    return read_gguf(path)
