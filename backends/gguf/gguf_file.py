"""Read and check a GGUF file with the standard library alone.

llama.cpp can abort the whole process on a truncated or corrupt .gguf, so hanlin reads the
header, the metadata table and the tensor table itself, and checks that every tensor's data
lies inside the file, before llama.cpp opens it. The same pass gives the metadata hanlin
needs (architecture, context length, chat template, special token ids) on a phone that has
neither the `gguf` package nor numpy.

    read_gguf(path)       header, metadata and tensor table; ModelError if they are bad
    validate_gguf(path)   read_gguf, then the tensor data: laid out as llama.cpp requires
                          and inside the file (the check a truncated download fails)

The layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x   (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets are relative to here)

A string is a u64 length and that many UTF-8 bytes; an array is a u32 element type, a u64
count and the elements.

The checks follow llama.cpp's own loader (ggml/src/gguf.cpp, llama-vocab.cpp), so a file
that passes here is one llama.cpp opens without tripping an assertion: general.alignment
must be a u32 power of two (llama.cpp asserts the type), tensor names are shorter than 64
bytes, at most 4 dimensions, rows a whole number of quantization blocks, tensors stored
back to back in table order (each padded to the alignment), and the tokenizer's tables
have the element types and lengths llama.cpp indexes them with.

The file is memory-mapped and walked with struct.unpack_from; the big tokenizer arrays are
walked (so a truncated one is caught) but not decoded unless asked for. Where mmap is not
available the header part of the file is read into memory in growing pieces instead.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from hanlin.backends.base import ModelError

__all__ = [
    "GGML_TYPES",
    "ArraySummary",
    "GGUFInfo",
    "TensorInfo",
    "check_tensor_data",
    "read_gguf",
    "validate_gguf",
]

MAGIC = b"GGUF"
HEADER_SIZE = 24  # magic, version, n_tensors, n_kv
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter than this (in bytes)

# Counts past these that the file could not hold either are corruption; a plausible count in
# a short file is a truncation, reported where the file ends.
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 24
MAX_ARRAY = 1 << 32  # elements (llama.cpp indexes the vocabulary with a u32)
MAX_STRING = 1 << 32  # bytes
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset

_REFETCH = "download it again (a catalogue model: `hanlin pull NAME --force`)"
_RECONVERT = "re-convert it with a current llama.cpp (convert_hf_to_gguf.py) or " + _REFETCH

# value type id -> struct for one value; 8 = string and 9 = array are handled apart
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
    4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
    10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d"),
}  # fmt: skip
UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9
VALUE_TYPES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
               7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}  # fmt: skip

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_HEAD = struct.Struct("<4sIQQ").unpack_from
_TYPE_OFFSET = struct.Struct("<IQ").unpack_from

# ggml type id -> (name, elements per block, bytes per block); ggml.c's type_traits, checked
# against gguf.constants.GGML_QUANT_SIZES by the tests.
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
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# Types ggml once had and removed: files that use them must be re-quantized.
_REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
                  36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}  # fmt: skip

# Tokenizer tables llama.cpp indexes directly (an assertion or an out-of-bounds read if wrong):
# key -> element type it must have; scores and token_type must be as long as tokens.
_TOKENIZER_ARRAYS = {
    "tokenizer.ggml.tokens": STRING,
    "tokenizer.ggml.merges": STRING,
    "tokenizer.ggml.scores": FLOAT32,
    "tokenizer.ggml.token_type": INT32,
}

# Arrays this long (the tokenizer's own tables) are walked but not decoded unless asked for.
_BIG_ARRAY_MIN = 1024
_FIRST_READ = 8 << 20  # without mmap: bytes read first, grown 4x until the tables fit


@dataclass(frozen=True)
class ArraySummary:
    """An array value that was walked (so it is known to be intact) but not kept."""

    type: int  # element value type (8 = string)
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the fastest-moving dimension (a row)
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
    data_offset: int  # absolute offset of the data section
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        v = self.metadata.get("general.architecture")
        return v if isinstance(v, str) else None

    @property
    def context_length(self) -> int | None:
        return _opt_int(self.metadata.get(f"{self.architecture}.context_length"))

    @property
    def chat_template(self) -> str | None:
        v = self.metadata.get("tokenizer.chat_template")
        return v if isinstance(v, str) else None

    @property
    def bos_token_id(self) -> int | None:
        return _opt_int(self.metadata.get("tokenizer.ggml.bos_token_id"))

    @property
    def eos_token_id(self) -> int | None:
        return _opt_int(self.metadata.get("tokenizer.ggml.eos_token_id"))

    @property
    def name(self) -> str:
        """general.name, or the file name when the file has none."""
        v = self.metadata.get("general.name")
        return v if isinstance(v, str) and v else os.path.basename(self.path)

    @property
    def file_type(self) -> int | None:
        return _opt_int(self.metadata.get("general.file_type"))

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tokens(self) -> list[str] | None:
        """tokenizer.ggml.tokens, when it was read (read_gguf(tokens=True) or read_arrays=True)."""
        v = self.metadata.get("tokenizer.ggml.tokens")
        return v if isinstance(v, list) else None

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_token_id)

    def _token_text(self, token_id: int | None) -> str | None:
        toks = self.tokens
        if toks is None or token_id is None or not 0 <= token_id < len(toks):
            return None
        return toks[token_id]

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends: the smallest size a complete file can have."""
        return max((t.offset + t.nbytes for t in self.tensors), default=self.data_offset)


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# --------------------------------------------------------------------------------------
# Internal signals, turned into ModelError (with the path and the place) by read_gguf
# --------------------------------------------------------------------------------------


class _Truncated(Exception):
    """The file ends before `need` bytes at `pos` could be read."""

    def __init__(self, pos: int, need: int, detail: str = ""):
        self.pos, self.need, self.detail = pos, need, detail


class _Corrupt(Exception):
    """The bytes are there but cannot be right: the message says what is wrong."""


class _NeedMore(Exception):
    """(No mmap) the bytes read so far end before the tables do: read more and start again."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike, *, read_arrays: bool = False, tokens: bool = False) -> GGUFInfo:
    """Read the header, metadata and tensor table of a GGUF file; ModelError if they are bad.

    read_arrays: keep every array value as a list (the big tokenizer tables included).
        Otherwise arrays of 1024+ elements are walked (so a truncated or corrupt one is
        still caught) and stored as ArraySummary(type, length).
    tokens: also keep tokenizer.ggml.tokens as a list (GGUFInfo.tokens, .bos_token, .eos_token).

    The tensor data itself is not looked at: validate_gguf does that.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the `with f` below)
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a folder, not a .gguf file") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                _refuse_short(path, f.read(), size)
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file system without mmap: read the tables instead
                mm = None
            if mm is not None:
                with mm:
                    return _parse(path, mm, len(mm), len(mm), read_arrays, tokens)
            return _parse_by_reading(path, f, size, read_arrays, tokens)
        except OSError as e:
            raise ModelError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_by_reading(path: str, f: Any, size: int, read_arrays: bool, want_tokens: bool) -> GGUFInfo:
    n = min(size, _FIRST_READ)
    while True:
        f.seek(0)
        buf = f.read(n)
        file_size = size if len(buf) == n else len(buf)  # the file shrank under us: it ends here
        try:
            return _parse(path, buf, len(buf), file_size, read_arrays, want_tokens)
        except _NeedMore:
            n = min(size, n * 4)


def _refuse_short(path: str, head: bytes, size: int) -> None:
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes): the download did not complete; {_REFETCH}")
    if MAGIC.startswith(head[:4]):
        raise ModelError(
            f"{path} is truncated: it is only {size} bytes, shorter than the {HEADER_SIZE}-byte GGUF header; "
            f"the download is incomplete: {_REFETCH}"
        )
    raise ModelError(_not_gguf(path, head))


def _not_gguf(path: str, head: bytes) -> str:
    msg = f"{path} is not a GGUF file: it starts with {head[:8]!r}, not b'GGUF'"
    hint = _what_is_it(head)
    return f"{msg}; {hint}" if hint else f"{msg}; expected a .gguf model file"


def _what_is_it(head: bytes) -> str | None:
    """A guess at what a non-GGUF file is, from its first bytes."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if len(head) >= 9 and head[8:9] == b"{" and head[5:8] == b"\0\0\0":
        return "this looks like a safetensors file: give the model folder to the torch engine instead"
    if text.startswith(b"version https://git-lfs"):
        return "this is a Git LFS pointer, not the model: fetch the file itself (`git lfs pull`, or download it directly)"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<")):
        return "this looks like an HTML/XML page (an error or login page saved in place of the model?), not a GGUF file"
    if head[:2] == b"PK":
        return "this looks like a zip archive (a PyTorch .bin, a wheel?), not a GGUF file"
    if text[:1] in (b"{", b"["):
        return "this looks like a JSON file, not a GGUF file"
    if head[:2] == b"\x1f\x8b":
        return "this is a gzip archive: unpack it first"
    if head[:1] == b"\x80":
        return "this looks like a Python pickle (a PyTorch .pt/.bin?), not a GGUF file"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt"):
        return "this is a pre-GGUF GGML file: convert the original model to GGUF with a current llama.cpp"
    return None


def _parse(path: str, buf: Any, end: int, file_size: int, read_arrays: bool, want_tokens: bool) -> GGUFInfo:
    p = _Parser(buf, end, file_size)
    try:
        return p.parse(path, read_arrays, want_tokens)
    except _Truncated as t:
        detail = f": {t.detail}" if t.detail else f" (needed {t.need} bytes at byte {t.pos})"
        raise ModelError(
            f"{path} is truncated: the file ends at byte {file_size} while reading {p.where}{detail}; "
            f"the download is incomplete: {_REFETCH}"
        ) from None
    except _Corrupt as c:
        raise ModelError(f"{path} is corrupt: {c}; {_RECONVERT}") from None


class _Parser:
    def __init__(self, buf: Any, end: int, file_size: int):
        self.buf, self.end, self.file_size = buf, end, file_size
        self.pos = 0
        self.where = "the header"
        self.types: dict[str, tuple[int, int | None]] = {}  # key -> (value type, element type)
        self.etype: int | None = None  # element type of the last array read

    # ---- bounds ----------------------------------------------------------------------

    def _past(self, pos: int, n: int, detail: str = "") -> Exception:
        """The exception for a read of n bytes at pos that does not fit in the bytes at hand."""
        if pos + n <= self.file_size:
            return _NeedMore()  # only when reading without mmap: the file goes on
        return _Truncated(pos, n, detail)

    def _take(self, n: int) -> int:
        """Claim n bytes at the cursor; return where they start."""
        pos = self.pos
        if pos + n > self.end:
            raise self._past(pos, n)
        self.pos = pos + n
        return pos

    def u32(self) -> int:
        return _U32(self.buf, self._take(4))[0]

    def u64(self) -> int:
        return _U64(self.buf, self._take(8))[0]

    def string(self, what: str = "a string") -> str:
        n = self.u64()
        pos = self.pos
        if n > self.end - pos:
            if n > self.file_size - pos and n >= MAX_STRING:
                raise _Corrupt(f"{self.where}: {what} claims to be {n} bytes long")
            raise self._past(pos, n, f"{what} of {n} bytes at byte {pos} runs past the end of the file")
        self.pos = pos + n
        return _decode(self.buf[pos : pos + n])

    # ---- the file --------------------------------------------------------------------

    def parse(self, path: str, read_arrays: bool, want_tokens: bool) -> GGUFInfo:
        buf = self.buf
        magic, version, n_tensors, n_kv = _HEAD(buf, 0)
        if magic != MAGIC:
            raise ModelError(_not_gguf(path, bytes(buf[:64])))
        _check_version(path, version)
        self.pos = HEADER_SIZE
        size = self.file_size
        if n_tensors > MAX_TENSORS and n_tensors * _MIN_TENSOR_BYTES > size:
            raise _Corrupt(f"its header claims {n_tensors} tensors, more than a {size}-byte file can hold")
        if n_kv > MAX_KV and n_kv * _MIN_KV_BYTES > size:
            raise _Corrupt(f"its header claims {n_kv} metadata entries, more than a {size}-byte file can hold")

        info = GGUFInfo(path=path, version=version, file_size=size, alignment=DEFAULT_ALIGNMENT, data_offset=0)
        md = info.metadata
        for i in range(n_kv):
            self.where = f"metadata entry {i + 1} of {n_kv}"
            key = self.string("the key")
            self.where = f"metadata entry {i + 1} of {n_kv} ({key!r})"
            if key in md:
                raise _Corrupt(f"metadata key {key!r} appears twice")
            vtype = self.u32()
            keep = read_arrays or (want_tokens and key == "tokenizer.ggml.tokens")
            md[key] = self.value(key, vtype, keep)
            self.types[key] = (vtype, self.etype if vtype == ARRAY else None)
        self.where = "the metadata"
        info.alignment = self.check_metadata(md)

        raw = []
        names: set[str] = set()
        for i in range(n_tensors):
            self.where = f"tensor info {i + 1} of {n_tensors}"
            name = self.string("the tensor name")
            self.where = f"tensor info {i + 1} of {n_tensors} ({name!r})"
            n_dims = self.u32()
            if n_dims > MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}")
            shape = struct.unpack_from(f"<{n_dims}Q", buf, self._take(8 * n_dims))
            ggml_type, rel = _TYPE_OFFSET(buf, self._take(12))
            if name in names:
                raise _Corrupt(f"tensor {name!r} appears twice in the tensor table")
            names.add(name)
            raw.append((name, shape, ggml_type, rel))
        self.where = "the tensor table"

        info.data_offset = _pad(self.pos, info.alignment)
        for name, shape, ggml_type, rel in raw:
            type_name, nbytes = _tensor_size(path, name, shape, ggml_type)
            info.tensors.append(TensorInfo(name, shape, ggml_type, type_name, info.data_offset + rel, nbytes))
        return info

    def value(self, key: str, vtype: int, keep: bool) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return scalar.unpack_from(self.buf, self._take(scalar.size))[0]
        if vtype == STRING:
            return self.string("the value")
        if vtype != ARRAY:
            raise _Corrupt(f"metadata {key!r} has unknown value type {vtype} (known: 0 to 12)")
        etype = self.etype = self.u32()
        count = self.u64()
        pos = self.pos
        if etype == STRING:
            min_bytes = 8
        elif etype in _SCALARS:
            min_bytes = _SCALARS[etype].size
        elif etype == ARRAY:
            raise _Corrupt(f"metadata {key!r} is an array of arrays, which llama.cpp does not read")
        else:
            raise _Corrupt(f"metadata {key!r} is an array of unknown value type {etype} (known: 0 to 12)")
        need = count * min_bytes
        if need > self.file_size - pos and count >= MAX_ARRAY:
            raise _Corrupt(f"metadata {key!r} claims an array of {count} elements")
        if need > self.end - pos:
            raise self._past(pos, need, f"an array of {count} {VALUE_TYPES[etype]} values at byte {pos} runs past the end of the file")
        keep = keep or count < _BIG_ARRAY_MIN
        if etype != STRING:
            self.pos = pos + need
            if not keep:
                return ArraySummary(etype, count)
            return list(struct.unpack_from(f"<{count}{_SCALARS[etype].format[1:]}", self.buf, pos))
        out = self.strings(count, keep)
        return out if keep else ArraySummary(STRING, count)

    def strings(self, count: int, keep: bool) -> list[str] | None:
        """Walk an array of count strings from the cursor (the hot loop: 100k tokens/merges)."""
        buf, end, pos = self.buf, self.end, self.pos
        out: list[str] | None = [] if keep else None
        u64 = _U64
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self._past(pos, 8, f"string {i + 1} of {count} at byte {pos} runs past the end of the file")
            n = u64(buf, pos)[0]
            pos += 8
            if n > end - pos:
                if n > self.file_size - pos and n >= MAX_STRING:
                    raise _Corrupt(f"{self.where}: string {i + 1} of {count} claims to be {n} bytes long")
                raise self._past(pos, n, f"string {i + 1} of {count} ({n} bytes at byte {pos}) runs past the end of the file")
            if out is not None:
                out.append(_decode(buf[pos : pos + n]))
            pos += n
        self.pos = pos
        return out

    def check_metadata(self, md: dict[str, Any]) -> int:
        """The keys llama.cpp reads with asserting getters or indexes without bounds checks;
        returns the alignment."""
        types = self.types
        alignment = md.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in md and types["general.alignment"][0] != UINT32:
            raise _Corrupt(f"general.alignment is {alignment!r} stored as {_type_name(types['general.alignment'])}, expected a UINT32")
        if alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment is {alignment}, expected a power of two (default {DEFAULT_ALIGNMENT})")
        for key, etype in _TOKENIZER_ARRAYS.items():
            if key in md and types[key] != (ARRAY, etype):
                raise _Corrupt(f"{key} is {_type_name(types[key])}, expected an array of {VALUE_TYPES[etype]}")
        if "tokenizer.ggml.tokens" in md:
            n_tokens = len(md["tokenizer.ggml.tokens"])
            for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                if key in md and len(md[key]) != n_tokens:
                    raise _Corrupt(f"{key} has {len(md[key])} entries but tokenizer.ggml.tokens has {n_tokens}; they must match")
        return alignment


def _type_name(t: tuple[int, int | None]) -> str:
    vtype, etype = t
    if vtype == ARRAY:
        return f"an array of {VALUE_TYPES.get(etype, etype)}"
    return f"a {VALUE_TYPES.get(vtype, vtype)}"


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _check_version(path: str, version: int) -> None:
    if version in (2, 3):
        return
    if version == 1:
        raise ModelError(f"{path}: GGUF version 1 is not supported; re-convert the model with a current llama.cpp (convert_hf_to_gguf.py)")
    if version == 0:
        raise ModelError(f"{path} is corrupt: its GGUF version is 0, which does not exist; {_REFETCH}")
    if version & 0xFFFF == 0:
        raise ModelError(
            f"{path} is a big-endian GGUF file (its version reads {version:#x}): this machine is little-endian; "
            "use the little-endian file of this model"
        )
    raise ModelError(f"{path} is GGUF version {version}, newer than this hanlin reads (2 and 3); update hanlin, or the file is corrupt")


def _tensor_size(path: str, name: str, shape: tuple[int, ...], ggml_type: int) -> tuple[str, int]:
    """The type name and byte size of a tensor; _Corrupt/ModelError for what ggml refuses."""
    if len(name.encode("utf-8")) >= MAX_NAME:
        raise _Corrupt(f"tensor name {name[:80]!r} is {len(name.encode())} bytes; ggml allows at most {MAX_NAME - 1}")
    n = 1
    for j, d in enumerate(shape):
        if d >= 1 << 63:
            raise _Corrupt(f"tensor {name!r} has a negative dimension {j} ({d - (1 << 64)})")
        if d == 0:
            raise _Corrupt(f"tensor {name!r} has shape {list(shape)}: dimension {j} is zero")
        n *= d
    if n >= 1 << 63:
        raise _Corrupt(f"tensor {name!r} has shape {list(shape)}: {n} elements is more than ggml can index")
    if ggml_type not in GGML_TYPES:
        if ggml_type in _REMOVED_TYPES:
            raise ModelError(
                f"{path}: tensor {name!r} has ggml type {ggml_type} ({_REMOVED_TYPES[ggml_type]}), which ggml no longer "
                "supports: re-quantize the model with a current llama.cpp"
            )
        raise ModelError(
            f"{path}: tensor {name!r} has ggml type {ggml_type}, which this hanlin does not know: a newer quantization "
            f"(update hanlin) or a corrupt file ({_REFETCH})"
        )
    type_name, block, type_size = GGML_TYPES[ggml_type]
    row = shape[0] if shape else 1
    if row % block:
        raise _Corrupt(f"tensor {name!r} ({type_name}) has rows of {row} elements, not a whole number of {type_name} blocks of {block}")
    return type_name, n // block * type_size


# --------------------------------------------------------------------------------------
# The tensor data
# --------------------------------------------------------------------------------------


def check_tensor_data(info: GGUFInfo) -> None:
    """The tensor data is laid out as llama.cpp requires (in table order, each tensor at the
    previous one's end rounded up to the alignment) and lies inside the file."""
    path, align = info.path, info.alignment
    expected = 0  # data offset where the next tensor must start
    prev: TensorInfo | None = None
    for t in info.tensors:
        rel = t.offset - info.data_offset
        if rel % align:
            raise ModelError(
                f"{path} is corrupt: tensor {t.name!r} starts at data offset {rel}, not a multiple of the alignment {align}; {_RECONVERT}"
            )
        if rel != expected:
            if prev is None:
                what = f"the first tensor {t.name!r} starts at data offset {rel}, expected 0"
            elif rel < expected:
                what = (f"tensor {t.name!r} starts at data offset {rel}, which overlaps tensor {prev.name!r} "
                        f"(data offsets {prev.offset - info.data_offset} to {prev.offset - info.data_offset + prev.nbytes}); expected {expected}")  # fmt: skip
            else:
                what = (f"tensor {t.name!r} starts at data offset {rel}, {rel - expected} bytes after where tensor "
                        f"{prev.name!r} ends (padded to {align}); expected {expected}: llama.cpp requires tensors back to back")  # fmt: skip
            raise ModelError(f"{path} is corrupt: {what}; {_RECONVERT}")
        expected = rel + _pad(t.nbytes, align)
        prev = t
    need = info.data_end
    for i, t in enumerate(info.tensors):
        start, end = t.offset, t.offset + t.nbytes
        if end > info.file_size:
            more = len(info.tensors) - i - 1
            rest = f" (and the {more} tensors after it)" if more > 1 else " (and the one after it)" if more == 1 else ""
            raise ModelError(
                f"{path} is truncated: tensor {t.name!r}{rest} needs bytes [{start}, {end}) but the file is only "
                f"{info.file_size} bytes; the download is incomplete: expected at least {need} bytes; {_REFETCH}"
            )


def validate_gguf(path: str | os.PathLike) -> GGUFInfo:
    """read_gguf, then check_tensor_data: refuse a bad file before llama.cpp opens it."""
    info = read_gguf(path)
    check_tensor_data(info)
    return info
