"""The stdlib GGUF reader: agrees with the `gguf` package on the real model, and refuses
every kind of truncated or corrupt file with a message that says what is wrong."""

from __future__ import annotations

import os
import struct

import pytest

from hanlin.backends.base import ModelError
from hanlin.backends.gguf.gguf_file import GGML_TYPES, ArraySummary, read_gguf, validate_gguf


@pytest.fixture(scope="module")
def real(default_model_path):
    return read_gguf(default_model_path, tokens=True)


def test_real_model_metadata(real, default_model_path):
    assert real.version == 3
    assert real.architecture == "llama" and real.context_length == 8192
    assert len(real.tensors) == 272
    assert real.bos_token_id == 1 and real.eos_token_id == 2
    assert real.chat_template.startswith("{% for message in messages %}")
    assert len(real.tokens) == 49152 and real.tokens[2] == "<|im_end|>" and real.tokens[1] == "<|im_start|>"
    assert real.metadata["tokenizer.ggml.merges"] == ArraySummary(8, 48900)
    assert 134_000_000 < real.n_params < 135_000_000
    assert real.data_end == real.file_size == os.path.getsize(default_model_path)


def test_tensor_table_agrees_with_the_gguf_package(real, default_model_path):
    gguf = pytest.importorskip("gguf", reason="dev extra: the gguf package is the reference reader")
    ref = gguf.GGUFReader(default_model_path)
    assert [t.name for t in ref.tensors] == [t.name for t in real.tensors]
    for a, b in zip(ref.tensors, real.tensors):
        assert (int(a.tensor_type), int(a.data_offset), int(a.n_bytes)) == (b.ggml_type, b.offset, b.nbytes), b.name
        assert tuple(int(x) for x in a.shape) == b.shape


def test_type_table_agrees_with_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    for type_id, (name, block, size) in GGML_TYPES.items():
        t = gguf.GGMLQuantizationType(type_id)
        assert t.name == name
        assert gguf.GGML_QUANT_SIZES[t] == (block, size), name


def write_prefix(src: str, dst, n: int) -> str:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(n))
    return str(dst)


@pytest.mark.parametrize(
    "cut,needles",
    [
        (0, ["is not a GGUF file", "the file is empty"]),
        (3, ["is not a GGUF file"]),
        (20, ["truncated", "shorter than the 24-byte GGUF header"]),
        (200, ["truncated", "while reading metadata entry"]),
        (5_000, ["truncated", "while reading metadata entry", "tokenizer.ggml.tokens"]),
        (1_900_000, ["truncated", "while reading tensor info"]),
        (5_000_000, ["truncated", "needs bytes", "the download is incomplete", "expected at least 98362432 bytes"]),
        (-1, ["truncated", "needs bytes", "the file is only 98362431 bytes"]),
    ],
    ids=["empty", "magic", "header", "kv", "tokens", "tensor-table", "data", "one-byte-short"],
)
def test_truncated_real_model(tmp_path, default_model_path, real, cut, needles):
    size = os.path.getsize(default_model_path)
    n = size - 1 if cut == -1 else cut
    if cut == 1_900_000:  # inside the tensor table: just before the data section starts
        n = real.data_offset - 100
    path = write_prefix(default_model_path, tmp_path / "cut.gguf", n)
    with pytest.raises(ModelError) as e:
        validate_gguf(path)
    msg = str(e.value)
    assert path in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def header(version=3, n_tensors=0, n_kv=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def gstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def tensor_info(name: str, shape, ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", ggml_type, offset)


def build(tmp_path, body: bytes, name="x.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(body)
    return str(p)


def test_a_small_valid_file_round_trips(tmp_path):
    kv = gstr("general.architecture") + struct.pack("<I", 8) + gstr("llama")
    kv += gstr("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 128)
    kv += gstr("general.tags") + struct.pack("<IIQ", 9, 8, 2) + gstr("a") + gstr("b")
    tensors = tensor_info("w", (32, 2), 0, 0) + tensor_info("q", (64,), 8, 256)
    head = header(3, 2, 3) + kv + tensors
    pad = (-len(head)) % 32
    body = head + b"\0" * pad + b"\1" * 256 + b"\2" * 68
    info = validate_gguf(build(tmp_path, body))
    assert info.architecture == "llama" and info.context_length == 128 and info.metadata["general.tags"] == ["a", "b"]
    assert [(t.name, t.type_name, t.nbytes) for t in info.tensors] == [("w", "F32", 256), ("q", "Q8_0", 68)]
    assert info.data_end == info.file_size
    with pytest.raises(ModelError, match="tensor 'q' needs bytes"):
        validate_gguf(build(tmp_path, body[:-1], "short.gguf"))


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"{\"__metadata__\": {}}" + b"\0" * 40, "JSON"),
        (struct.pack("<Q", 100) + b'{"w": {"dtype": "F32"}}' + b"\0" * 40, "safetensors"),
        (b"<!DOCTYPE html><html><body>Not Found</body></html>", "HTML"),
        (b"PK\x03\x04" + b"\0" * 40, "zip"),
        (header(version=1) + b"\0" * 16, "GGUF version 1, which is not supported"),
        (header(version=7) + b"\0" * 16, "GGUF version 7"),
        (header(n_tensors=10**15) + b"\0" * 16, "claims 1000000000000000 tensors"),
        (header(n_kv=1) + gstr("k") + struct.pack("<I", 99) + b"\0" * 16, "unknown value type 99"),
        (header(n_kv=1) + gstr("k") + struct.pack("<IIQ", 9, 42, 1) + b"\0" * 16, "array of unknown type 42"),
        (header(n_kv=1) + gstr("k") + struct.pack("<IIQ", 9, 4, 10**12) + b"\0" * 16, "truncated"),
        (header(n_tensors=1) + tensor_info("w", (32,), 77, 0) + b"\0" * 160, "ggml type 77"),
        (header(n_tensors=1) + tensor_info("w", (32,), 0, 3) + b"\0" * 160, "not a multiple of the alignment 32"),
        (header(n_tensors=1) + tensor_info("w", (30,), 2, 0) + b"\0" * 160, "not a whole number of Q4_0 blocks"),
        (header(n_tensors=1) + gstr("w") + struct.pack("<I", 9) + b"\0" * 200, "has 9 dimensions"),
        (header(n_tensors=2) + tensor_info("a", (32,), 0, 0) + tensor_info("b", (32,), 0, 64) + b"\0" * 256, "overlap"),
        (header(n_tensors=2) + tensor_info("a", (8,), 0, 0) + tensor_info("a", (8,), 0, 32) + b"\0" * 256, "appears twice"),
    ],
    ids=["json", "safetensors", "html", "zip", "v1", "v7", "absurd-count", "value-type", "array-type", "array-count",
         "ggml-type", "misaligned", "partial-block", "dims", "overlap", "duplicate"],
)
def test_corrupt_files_are_refused(tmp_path, body, needle):
    with pytest.raises(ModelError) as e:
        validate_gguf(build(tmp_path, body))
    assert needle in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_gguf(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="is a folder"):
        read_gguf(str(tmp_path))
