"""The stdlib GGUF reader: agrees with the `gguf` package on the real model, and refuses
every kind of truncated or corrupt file with a message that says what is wrong, where, and
what to do about it."""

from __future__ import annotations

import ast
import os
import struct
import sys
import time

import pytest
from hanlin.backends.base import ModelError
from hanlin.backends.gguf import gguf_file
from hanlin.backends.gguf.gguf_file import (
    GGML_TYPES,
    ArraySummary,
    check_tensor_data,
    read_gguf,
    validate_gguf,
)

# ======================================================================================
# The real default model
# ======================================================================================

N_TENSORS, N_KV, N_TOKENS, N_MERGES = 272, 33, 49152, 48900


@pytest.fixture(scope="module")
def real(default_model_path):
    return read_gguf(default_model_path, tokens=True)


@pytest.fixture(scope="module")
def ref(default_model_path):
    gguf = pytest.importorskip("gguf", reason="dev extra: the gguf package is the reference reader")
    return gguf.GGUFReader(default_model_path)


def test_real_model_metadata(real, default_model_path):
    assert real.version == 3 and real.alignment == 32
    assert real.architecture == "llama" and real.context_length == 8192
    assert len(real.tensors) == N_TENSORS and len(real.metadata) == N_KV
    assert real.bos_token_id == 1 and real.eos_token_id == 2
    assert real.chat_template.startswith("{% for message in messages %}")
    assert len(real.tokens) == N_TOKENS and real.tokens[2] == "<|im_end|>" and real.tokens[1] == "<|im_start|>"
    assert (real.bos_token, real.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert real.name == "Smollm2 135M 8k Lc100K Mix1 Ep2" and real.file_type == 3  # 3 = MOSTLY_Q4_1
    assert 134_000_000 < real.n_params < 135_000_000
    assert real.file_size == os.path.getsize(default_model_path)


def test_big_arrays_are_walked_not_kept_by_default(default_model_path):
    info = read_gguf(default_model_path)
    md = info.metadata
    assert md["tokenizer.ggml.tokens"] == ArraySummary(8, N_TOKENS)  # 8 = STRING
    assert md["tokenizer.ggml.merges"] == ArraySummary(8, N_MERGES)
    assert md["tokenizer.ggml.token_type"] == ArraySummary(5, N_TOKENS)  # 5 = INT32
    assert md["general.languages"] == ["en"]  # small arrays are kept
    assert info.tokens is None and info.bos_token is None
    assert info.chat_template.startswith("{% for message in messages %}")


def test_every_value_agrees_with_the_gguf_package(default_model_path, ref):
    info = read_gguf(default_model_path, read_arrays=True)
    expected = {name: f.contents() for name, f in ref.fields.items() if not name.startswith("GGUF.")}
    assert list(info.metadata) == list(expected)
    for key, value in expected.items():
        assert info.metadata[key] == value, key
    assert len(info.metadata["tokenizer.ggml.merges"]) == N_MERGES


def test_tensor_table_agrees_with_the_gguf_package(real, ref):
    assert real.data_offset == ref.data_offset
    assert [t.name for t in real.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ref.tensors, real.tensors):
        assert (int(a.tensor_type), a.tensor_type.name, int(a.data_offset), int(a.n_bytes)) == (
            b.ggml_type, b.type_name, b.offset, b.nbytes), b.name  # fmt: skip
        assert tuple(int(x) for x in a.shape) == b.shape, b.name
    assert real.n_params == sum(int(t.n_elements) for t in ref.tensors)


def test_file_ends_where_the_last_tensor_ends(real, default_model_path):
    info = validate_gguf(default_model_path)
    last = max(info.tensors, key=lambda t: t.offset)
    assert info.data_end == last.offset + last.nbytes
    assert info.data_end <= info.file_size < info.data_end + info.alignment


def test_validating_the_real_model_is_fast(default_model_path):
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        validate_gguf(default_model_path)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.3, f"validate_gguf took {best:.3f} s"


def test_type_table_agrees_with_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    known = {int(t) for t in gguf.GGMLQuantizationType}
    assert known <= set(GGML_TYPES), f"ggml types missing here: {sorted(known - set(GGML_TYPES))}"
    checked = 0
    for type_id, (name, block, size) in GGML_TYPES.items():
        if type_id not in known:  # an older gguf package than this table
            continue
        t = gguf.GGMLQuantizationType(type_id)
        assert t.name == name
        assert gguf.GGML_QUANT_SIZES[t] == (block, size), name
        checked += 1
    assert checked >= 30


def test_the_module_imports_only_the_standard_library():
    with open(gguf_file.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module if node.module.startswith("hanlin") else node.module.split(".")[0])
    assert "struct" in roots
    assert roots - set(sys.stdlib_module_names) == {"hanlin.backends.base"}


# ======================================================================================
# Truncated copies of the real model
# ======================================================================================


def write_prefix(src: str, dst, n: int, keep: int) -> str:
    """The first n bytes of src at dst: at most `keep` real bytes, the rest a sparse hole
    (the reader never looks at tensor data, only at the file's size)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(min(n, keep)))
        g.truncate(n)
    return str(dst)


def truncated(tmp_path, default_model_path, real, n: int) -> str:
    with pytest.raises(ModelError) as e:
        validate_gguf(write_prefix(default_model_path, tmp_path / "cut.gguf", n, real.data_offset))
    msg = str(e.value)
    assert str(tmp_path / "cut.gguf") in msg
    return msg


@pytest.mark.parametrize(
    "n,needles",
    [
        (0, ["is empty (0 bytes)", "download it again", "hanlin pull"]),
        (3, ["is truncated", "only 3 bytes", "24-byte GGUF header", "hanlin pull"]),
        (20, ["is truncated", "only 20 bytes", "24-byte GGUF header"]),
        (30, ["is truncated", "ends at byte 30 while reading metadata entry 1 of 33"]),
        (60, ["is truncated", "ends at byte 60 while reading metadata entry 1 of 33 ('general.architecture')"]),
    ],
    ids=["empty", "3-bytes", "in-header", "in-first-key", "in-first-value"],
)
def test_truncated_in_the_header(tmp_path, default_model_path, real, n, needles):
    msg = truncated(tmp_path, default_model_path, real, n)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("key,into", [("tokenizer.chat_template", 60), ("tokenizer.ggml.tokens", 5000), ("tokenizer.ggml.merges", 300_000)])
def test_truncated_in_the_metadata(tmp_path, default_model_path, real, ref, key, into):
    index = [k for k in ref.fields if not k.startswith("GGUF.")].index(key) + 1
    n = ref.fields[key].offset + into
    msg = truncated(tmp_path, default_model_path, real, n)
    assert f"is truncated: the file ends at byte {n} while reading metadata entry {index} of {N_KV} ({key!r})" in msg
    assert "runs past the end of the file" in msg and "the download is incomplete" in msg


@pytest.mark.parametrize("i,into", [(0, 3), (16, 5), (N_TENSORS - 1, 40)])
def test_truncated_in_the_tensor_table(tmp_path, default_model_path, real, ref, i, into):
    n = ref.tensors[i].field.offset + into
    msg = truncated(tmp_path, default_model_path, real, n)
    assert f"is truncated: the file ends at byte {n} while reading tensor info {i + 1} of {N_TENSORS}" in msg
    assert "the download is incomplete" in msg


@pytest.mark.parametrize("where", ["no-data", "first-tensor", "middle", "one-byte-short"])
def test_truncated_in_the_data(tmp_path, default_model_path, real, ref, where):
    size = real.file_size
    last = ref.tensors[-1].field
    tables_end = last.offset + sum(int(part.nbytes) for part in last.parts)  # then padding, then data
    assert real.data_offset - real.alignment < tables_end <= real.data_offset
    n = {"no-data": tables_end, "first-tensor": real.data_offset + 1000,
         "middle": size // 2, "one-byte-short": size - 1}[where]  # fmt: skip
    cut = [t for t in real.tensors if t.offset + t.nbytes > n]
    first = cut[0]
    msg = truncated(tmp_path, default_model_path, real, n)
    assert f"is truncated: tensor {first.name!r}" in msg
    assert f"needs bytes [{first.offset}, {first.offset + first.nbytes}) but the file is only {n} bytes" in msg
    assert f"expected at least {real.data_end} bytes" in msg and "hanlin pull" in msg
    if len(cut) > 2:
        assert f"and the {len(cut) - 1} tensors after it" in msg
    # The metadata of a file cut in its data is still readable: only validation refuses it.
    if n >= real.data_offset:
        assert read_gguf(str(tmp_path / "cut.gguf")).architecture == "llama"


def test_without_mmap_the_tables_are_read_in_growing_pieces(tmp_path, default_model_path, real, monkeypatch):
    def no_mmap(*a, **k):
        raise OSError(19, "No such device")

    monkeypatch.setattr(gguf_file.mmap, "mmap", no_mmap)
    monkeypatch.setattr(gguf_file, "_FIRST_READ", 4096)  # forces several rounds of reading more
    info = read_gguf(default_model_path, tokens=True)
    assert info.tokens == real.tokens and info.tensors == real.tensors and info.data_offset == real.data_offset
    assert info.metadata == real.metadata
    n = real.tensors[100].offset - 7  # the tables are whole; the data is not
    msg = truncated(tmp_path, default_model_path, real, n)
    assert f"tensor {real.tensors[99].name!r}" in msg and f"only {n} bytes" in msg
    n = 400_000  # inside the token list
    assert f"ends at byte {n} while reading metadata entry" in truncated(tmp_path, default_model_path, real, n)


# ======================================================================================
# Crafted files
# ======================================================================================

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def val(vtype: int, v) -> bytes:
    return gstr(v) if vtype == STR else struct.pack("<" + _FMT[vtype], v)


def kv(key: str, vtype: int, v) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + val(vtype, v)


def kv_array(key: str, etype: int, items) -> bytes:
    return gstr(key) + struct.pack("<IIQ", ARR, etype, len(items)) + b"".join(val(etype, x) for x in items)


def tinfo(name: str, shape, ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, offset)


def gguf_bytes(kvs=(), tensors=(), *, version=3, n_tensors=None, n_kv=None, data=None, alignment=32) -> bytes:
    """A GGUF file: header, KV pairs (packed), tensor infos (name, shape, type, offset) and
    `data` bytes of tensor data (zeros enough for every tensor by default)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tinfo(*t) for t in tensors)
    body += b"\0" * ((-len(body)) % alignment)
    if data is None:
        data = 0
        for name, shape, ggml_type, offset in tensors:
            _, block, size = GGML_TYPES.get(ggml_type, ("", 1, 1))
            n = 1
            for d in shape:
                n *= d
            data = max(data, offset + n // block * size)
    return body + b"\0" * data


def build(tmp_path, body: bytes, name="x.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(body)
    return str(p)


def refused(tmp_path, body: bytes, *needles: str, read_only: bool = False) -> str:
    path = build(tmp_path, body)
    with pytest.raises(ModelError) as e:
        (read_gguf if read_only else validate_gguf)(path)
    msg = str(e.value)
    assert path in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_a_small_crafted_file_round_trips(tmp_path):
    kvs = [kv("general.architecture", STR, "llama"), kv("llama.context_length", U32, 128), kv("general.name", STR, "tiny"),
           kv_array("general.tags", STR, ["a", "b"]), kv("x.i8", I8, -3), kv("x.f64", F64, 0.25), kv("x.b", BOOL, True),
           kv_array("x.big", U16, list(range(2000)))]  # fmt: skip
    tensors = [("w", (32, 2), 0, 0), ("q", (64,), 8, 256), ("s", (), 0, 352)]  # F32 256 B; Q8_0 68 B -> 96; a scalar
    body = gguf_bytes(kvs, tensors)
    info = validate_gguf(build(tmp_path, body))
    assert info.architecture == "llama" and info.context_length == 128 and info.name == "tiny"
    assert info.metadata["general.tags"] == ["a", "b"] and info.metadata["x.i8"] == -3
    assert info.metadata["x.f64"] == 0.25 and info.metadata["x.b"] is True
    assert info.metadata["x.big"] == ArraySummary(U16, 2000)
    assert read_gguf(build(tmp_path, body), read_arrays=True).metadata["x.big"] == list(range(2000))
    assert [(t.name, t.type_name, t.shape, t.offset - info.data_offset, t.nbytes) for t in info.tensors] == [
        ("w", "F32", (32, 2), 0, 256), ("q", "Q8_0", (64,), 256, 68), ("s", "F32", (), 352, 4)]  # fmt: skip
    assert info.n_params == 64 + 64 + 1 and info.data_end == info.file_size
    refused(tmp_path, body[:-1], "is truncated: tensor 's' needs bytes", f"expected at least {len(body)} bytes")


def test_a_file_written_by_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "w.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    values = {"t.u8": (7, "UINT8"), "t.i8": (-7, "INT8"), "t.u16": (700, "UINT16"), "t.i16": (-700, "INT16"),
              "t.u32": (70000, "UINT32"), "t.i32": (-70000, "INT32"), "t.f32": (1.5, "FLOAT32"), "t.bool": (True, "BOOL"),
              "t.str": ("héllo", "STRING"), "t.u64": (2**40, "UINT64"), "t.i64": (-(2**40), "INT64"), "t.f64": (0.1, "FLOAT64")}  # fmt: skip
    for key, (v, t) in values.items():
        w.add_key_value(key, v, gguf.GGUFValueType[t])
    w.add_context_length(4096)
    w.add_array("t.floats", [0.5, 1.5])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.zeros(48, dtype=np.float16))
    w.add_tensor("c", np.zeros((4, 136), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 4 blocks of 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = validate_gguf(path)
    assert info.architecture == "qwen2" and info.context_length == 4096
    assert {k: info.metadata[k] for k in values} == {k: v for k, (v, _) in values.items()} | {"t.f64": 0.1}
    assert info.metadata["t.floats"] == [0.5, 1.5]
    ref = gguf.GGUFReader(path)
    assert [(t.name, t.shape, t.type_name, t.offset, t.nbytes) for t in info.tensors] == [
        (t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.data_offset), int(t.n_bytes)) for t in ref.tensors]  # fmt: skip
    assert [t.shape for t in info.tensors] == [(32, 2), (48,), (128, 4)]


SAFETENSORS = struct.pack("<Q", 60) + b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}' + b"\0" * 8


@pytest.mark.parametrize(
    "body,needles",
    [
        (SAFETENSORS, ["is not a GGUF file: it starts with b'<\\x00\\x00\\x00", "safetensors"]),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", ["it starts with b'<!DOCTYP'", "HTML"]),
        (b"\n  <html><head></head></html>" * 2, ["HTML"]),
        (b"PK\x03\x04" + b"\0" * 40, ["it starts with b'PK\\x03\\x04", "zip"]),
        (b'{"error": "not found", "status": 404}', ["JSON"]),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 98362432\n", ["Git LFS pointer"]),
        (b"tjgg" + b"\0" * 40, ["pre-GGUF GGML file"]),
        (b"\0" * 100, ["it starts with b'\\x00\\x00", "expected a .gguf model file"]),
        (b"GGUP" + b"\0" * 40, ["it starts with b'GGUP"]),
    ],
    ids=["safetensors", "html", "html-indented", "zip", "json", "git-lfs", "ggml", "zeros", "near-magic"],
)
def test_not_a_gguf_file(tmp_path, body, needles):
    refused(tmp_path, body, "is not a GGUF file", *needles)


@pytest.mark.parametrize(
    "version,needles",
    [
        (1, ["GGUF version 1 is not supported; re-convert"]),
        (0, ["is corrupt", "version is 0"]),
        (7, ["is GGUF version 7", "newer than this hanlin reads (2 and 3)"]),
        (3 << 24, ["big-endian", "0x3000000"]),
    ],
)
def test_unsupported_versions(tmp_path, version, needles):
    refused(tmp_path, gguf_bytes(version=version) + b"\0" * 64, *needles)


def test_version_2_is_read(tmp_path):
    info = validate_gguf(build(tmp_path, gguf_bytes([kv("general.architecture", STR, "llama")], [("w", (32,), 0, 0)], version=2)))
    assert info.version == 2 and info.architecture == "llama" and info.tensors[0].nbytes == 128


@pytest.mark.parametrize(
    "body,needles",
    [
        (gguf_bytes(n_tensors=10**15), ["is corrupt", "claims 1000000000000000 tensors, more than a", "-byte file can hold"]),
        (gguf_bytes(n_kv=2**63 + 5), ["is corrupt", f"claims {2**63 + 5} metadata entries"]),
        # a plausible count in a short file is a truncation, reported where the file ends
        (gguf_bytes(n_tensors=5), ["is truncated", "while reading tensor info 1 of 5"]),
        (gguf_bytes(n_kv=3), ["is truncated", "while reading metadata entry 1 of 3"]),
    ],
    ids=["tensor-count", "kv-count", "short-tensors", "short-kv"],
)
def test_counts(tmp_path, body, needles):
    refused(tmp_path, body, *needles)


@pytest.mark.parametrize(
    "kvs,needles",
    [
        ([kv("k", U8, 1)[:-5] + struct.pack("<I", 99) + b"\0" * 8], ["is corrupt", "metadata 'k' has unknown value type 99"]),
        ([gstr("k") + struct.pack("<IIQ", ARR, 42, 1) + b"\0" * 8], ["metadata 'k' is an array of unknown value type 42"]),
        ([gstr("k") + struct.pack("<IIQ", ARR, ARR, 1) + b"\0" * 16], ["metadata 'k' is an array of arrays"]),
        ([gstr("k") + struct.pack("<IIQ", ARR, U32, 2**40) + b"\0" * 16], ["is corrupt", f"metadata 'k' claims an array of {2**40} elements"]),
        ([gstr("k") + struct.pack("<IIQ", ARR, U32, 1000) + b"\0" * 16], ["is truncated", "metadata entry 1 of 1 ('k')", "an array of 1000 UINT32 values"]),
        ([gstr("k") + struct.pack("<IIQ", ARR, STR, 3) + gstr("a") + struct.pack("<Q", 50) + b"x" * 8],
         ["is truncated", "string 2 of 3 (50 bytes at byte", "runs past the end of the file"]),
        ([struct.pack("<Q", 2**62) + b"k" * 16], ["is corrupt", f"metadata entry 1 of 1: the key claims to be {2**62} bytes long"]),
        ([gstr("k") + struct.pack("<IQ", STR, 100) + b"x" * 20], ["is truncated", "metadata entry 1 of 1 ('k')", "the value of 100 bytes at byte 45 runs past the end"]),
        ([kv("k", U32, 1), kv("k", U32, 2)], ["is corrupt", "metadata key 'k' appears twice"]),
        ([kv("general.alignment", U64, 32)], ["is corrupt", "general.alignment is 32 stored as a UINT64, expected a UINT32"]),
        ([kv("general.alignment", U32, 48)], ["is corrupt", "general.alignment is 48, expected a power of two"]),
        ([kv("general.alignment", U32, 0)], ["general.alignment is 0, expected a power of two"]),
        ([kv_array("tokenizer.ggml.tokens", I32, [1, 2])], ["tokenizer.ggml.tokens is an array of INT32, expected an array of STRING"]),
        ([kv("tokenizer.ggml.merges", STR, "a b")], ["tokenizer.ggml.merges is a STRING, expected an array of STRING"]),
        ([kv_array("tokenizer.ggml.tokens", STR, ["a", "b", "c"]), kv_array("tokenizer.ggml.scores", F32, [0.0, 1.0])],
         ["tokenizer.ggml.scores has 2 entries but tokenizer.ggml.tokens has 3"]),
        ([kv_array("tokenizer.ggml.tokens", STR, ["a"]), kv_array("tokenizer.ggml.token_type", STR, ["x"])],
         ["tokenizer.ggml.token_type is an array of STRING, expected an array of INT32"]),
    ],
    ids=["value-type", "array-type", "nested-array", "absurd-array", "short-array", "short-string-in-array",
         "absurd-key", "short-string", "duplicate-key", "alignment-type", "alignment-48", "alignment-0",
         "tokens-type", "merges-not-array", "scores-length", "token-type-type"],
)
def test_bad_metadata(tmp_path, kvs, needles):
    refused(tmp_path, gguf_bytes(kvs) + b"\0" * 8, *needles)


def test_a_larger_alignment_moves_the_data(tmp_path):
    body = gguf_bytes([kv("general.alignment", U32, 64)], [("a", (8,), 0, 0), ("b", (8,), 0, 64)], alignment=64)
    info = validate_gguf(build(tmp_path, body))
    assert info.alignment == 64 and info.data_offset % 64 == 0 and info.data_offset > 0
    assert [t.offset - info.data_offset for t in info.tensors] == [0, 64]
    refused(tmp_path, gguf_bytes([kv("general.alignment", U32, 64)], [("a", (8,), 0, 0), ("b", (8,), 0, 32)], alignment=64),
            "tensor 'b' starts at data offset 32, not a multiple of the alignment 64")  # fmt: skip


@pytest.mark.parametrize(
    "tensors,needles",
    [
        ([("w", (32,), 77, 0)], ["tensor 'w' has ggml type 77, which this hanlin does not know"]),
        ([("w", (32,), 31, 0)], ["tensor 'w' has ggml type 31 (Q4_0_4_4), which ggml no longer supports", "re-quantize"]),
        ([("w", (2, 2, 2, 2, 2), 0, 0)], ["is corrupt", "tensor 'w' has 5 dimensions; ggml allows at most 4"]),
        ([("w", (32, 0), 0, 0)], ["is corrupt", "tensor 'w' has shape [32, 0]: dimension 1 is zero"]),
        ([("w", (32, 2**64 - 3), 0, 0)], ["is corrupt", "tensor 'w' has a negative dimension 1 (-3)"]),
        ([("w", (2**40, 2**40), 0, 0)], ["is corrupt", "more than ggml can index"]),
        ([("w", (30,), 2, 0)], ["is corrupt", "tensor 'w' (Q4_0) has rows of 30 elements, not a whole number of Q4_0 blocks of 32"]),
        ([("n" * 64, (32,), 0, 0)], ["is corrupt", "is 64 bytes; ggml allows at most 63"]),
        ([("a", (8,), 0, 0), ("a", (8,), 0, 32)], ["is corrupt", "tensor 'a' appears twice in the tensor table"]),
    ],
    ids=["unknown-type", "removed-type", "dims", "zero-dim", "negative-dim", "overflow", "partial-block", "long-name", "duplicate"],
)
def test_bad_tensor_infos(tmp_path, tensors, needles):
    refused(tmp_path, gguf_bytes(tensors=tensors, data=256), *needles, read_only=True)


@pytest.mark.parametrize(
    "tensors,needles",
    [
        ([("w", (32,), 0, 3)], ["tensor 'w' starts at data offset 3, not a multiple of the alignment 32"]),
        ([("w", (32,), 0, 32)], ["the first tensor 'w' starts at data offset 32, expected 0"]),
        ([("a", (32,), 0, 0), ("b", (32,), 0, 64)], ["tensor 'b' starts at data offset 64, which overlaps tensor 'a' (data offsets 0 to 128); expected 128"]),
        ([("a", (8,), 0, 0), ("b", (8,), 0, 64)], ["tensor 'b' starts at data offset 64, 32 bytes after where tensor 'a' ends", "back to back"]),
    ],
    ids=["misaligned", "first-not-at-0", "overlap", "gap"],
)
def test_bad_tensor_layout(tmp_path, tensors, needles):
    body = gguf_bytes(tensors=tensors, data=512)
    read_gguf(build(tmp_path, body))  # the tables are fine; the data layout is not
    refused(tmp_path, body, "is corrupt", *needles, "re-convert")


def test_tensor_data_past_the_end_of_a_crafted_file(tmp_path):
    tensors = [("a", (32,), 0, 0), ("b", (64,), 1, 128), ("c", (32,), 8, 256), ("d", (32,), 8, 320)]
    body = gguf_bytes(tensors=tensors)
    info = validate_gguf(build(tmp_path, body))
    end = info.data_offset + 320 + 34
    assert info.data_end == end == len(body)
    msg = refused(tmp_path, body[: info.data_offset + 200], "is truncated: tensor 'b' (and the 2 tensors after it)")
    assert f"needs bytes [{info.data_offset + 128}, {info.data_offset + 256}) but the file is only {info.data_offset + 200} bytes" in msg
    assert f"expected at least {end} bytes" in msg
    refused(tmp_path, body[:-1], "tensor 'd' needs bytes", f"only {end - 1} bytes")
    refused(tmp_path, body[:-70], "tensor 'c' (and the one after it) needs bytes")
    # check_tensor_data on an info read elsewhere says the same
    short = build(tmp_path, body[:-1], "short.gguf")
    with pytest.raises(ModelError, match="tensor 'd' needs bytes"):
        check_tensor_data(read_gguf(short))


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_gguf(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="is a folder"):
        read_gguf(str(tmp_path))
    with pytest.raises(ModelError, match="is a folder"):
        validate_gguf(tmp_path)  # a PathLike is accepted like a str
