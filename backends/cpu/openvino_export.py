"""Export a float GGUF as an OpenVINO folder: the IR, its weights compressed by NNCF, the tokenizer.

    export_openvino("smol-f16.gguf", "smol-ov-int8", quant="int8", tokenizer_from="smol.gguf")

The route, and why it is this one:
- OpenVINO GenAI builds an OpenVINO model from a GGUF itself (its "legacy" GGUF reader:
  llama, qwen2 and qwen3). `LLMPipeline(gguf, "CPU", enable_save_ov_model=True)` saves what
  it built as openvino_model.xml/.bin, plus its own openvino_tokenizer/detokenizer IR,
  beside the GGUF. That model is *stateful*: the KV cache lives in the compiled model's
  variables (ReadValue/Assign), so a decode step copies no cache; it is what
  OpenVINOEngine drives. GenAI writes beside the GGUF it is given, so the GGUF is linked
  into a work folder inside our temporary output folder first: nothing is ever written
  beside the caller's file.
- The input is a float GGUF (sdk/export.py writes an F16 one). Given a float file, GenAI
  keeps the weights as float16 constants (exactly the GGUF's values), and "int8"/"int4"
  are then NNCF's weight compression of that float model, not GenAI's re-reading of
  llama.cpp blocks; that is what the quant names in this folder mean.
- quant="f32": no compression. The weights stay the float16 values of the F16 GGUF (an
  f32 copy would double the folder and add no information; GenAI saves float weights as
  float16 anyway, so an F32 GGUF is rounded to float16 here); OpenVINOEngine computes in
  float32 (INFERENCE_PRECISION_HINT=f32).
- quant="int8": NNCF INT8_ASYM, per output channel, every weight (embedding included).
  Asymmetric because on SmolLM2-135M (WikiText-2, 512 tokens) it had the lower KL
  divergence against the float model (0.0030 vs 0.0032 for INT8_SYM; KL is what
  `hanlin quant-report` ranks by) at nearly the same size (a zero point is one byte per
  row: 135.2 vs 135.0 MB); symmetric had the better top-1 (0.969 vs 0.961) and decoded about
  as fast (15.7 vs 14.6 tok/s, within the noise of a busy 2-core machine), so it is close.
  Asymmetric is also NNCF's and optimum-intel's default for int8.
- quant="int4": NNCF INT4_SYM, group size 64, the tied embedding/lm_head kept at INT8_ASYM
  (NNCF's data-free default "backup" for the first and last layer). Group 64 and not
  128 because a 128 group does not divide SmolLM2's hidden size of 576 (NNCF refuses);
  64 divides 576 and 1536; smaller groups are the more accurate ones here (g32: KL 0.25
  vs 0.30 at g64, at a scale per 32 weights). Symmetric because at g64 it had the better
  perplexity (20.24 vs 20.60; float 16.98) and top-1 agreement (0.740 vs 0.732), KL
  0.300 vs 0.293 for asym (a wash), and no zero points to store or apply. A row not a
  multiple of 64 in another model gets a smaller group (NNCF's ADJUST fallback) instead
  of an error.
- The tokenizer files beside the IR are hanlin's (backends/tokenizer.write_tokenizer_files:
  tokenizer.json etc.), so OpenVINOEngine's ids equal llama.cpp's; GenAI's own tokenizer
  IR is kept too, so the folder also runs in `openvino_genai.LLMPipeline(folder)`.
- Everything is written into a temporary folder beside `out_dir` and renamed into place
  (backends/files.folder_written_at): Ctrl-C leaves nothing at `out_dir` and no temporary
  folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator

from hanlin.backends.base import ConfigError, ModelError

__all__ = ["export_openvino", "QUANTS", "SUPPORTED_ARCHITECTURES", "META"]

QUANTS = ("f32", "int8", "int4")
# What OpenVINO GenAI's GGUF reader builds (openvino.genai src/cpp/src/gguf_utils/gguf_modeling.cpp)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
FLOAT_TYPES = ("F32", "F16")  # what GenAI reads as float weights (BF16 untested there)
META = "hanlin_openvino.json"
INT4_GROUP = 64
# Weights below which NNCF's numpy path is the faster one (_nncf_numpy_path): measured at 135M
# only; ~40 ms of compilation per weight matrix against ~50 ns per element for numpy puts the
# crossover near 1M elements per matrix, about a 300M-parameter model.
SMALL_MODEL = 300_000_000
MODEL_FILES = ("openvino_model.xml", "openvino_model.bin")
GENAI_TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin")


def export_openvino(gguf_path: str, out_dir: str, *, quant: str, tokenizer_from: str) -> str:
    """Write the float GGUF at gguf_path as an OpenVINO folder at out_dir with weights `quant`
    ("f32", "int8" or "int4"); the tokenizer files come from `tokenizer_from` (a GGUF or a
    Hugging Face folder). Returns the folder's absolute path."""
    if quant not in QUANTS:
        raise ConfigError(f"openvino export does not take quant={quant!r}: use one of {', '.join(QUANTS)}")
    info = _check_source(gguf_path)
    if not os.path.exists(tokenizer_from):
        raise ModelError(f"tokenizer_from={tokenizer_from} does not exist (a GGUF file or a Hugging Face folder is needed)")
    _need_libraries(quant)

    from hanlin.backends.files import folder_written_at
    from hanlin.backends.tokenizer import write_tokenizer_files

    out_dir = os.path.abspath(out_dir.rstrip("/"))
    with folder_written_at(out_dir) as tmp:
        work = os.path.join(tmp, ".gguf-convert")
        _convert_with_genai(gguf_path, work)
        weights = _write_model(work, tmp, quant)
        for name in GENAI_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(work, name)):
                os.replace(os.path.join(work, name), os.path.join(tmp, name))
        shutil.rmtree(work)
        write_tokenizer_files(tokenizer_from, tmp)
        _write_meta(tmp, info, quant, weights, gguf_path, tokenizer_from)
    return out_dir


# ---- checks before minutes of work ------------------------------------------------------


def _check_source(gguf_path: str) -> Any:
    """Our own GGUF reader's view of the file: an architecture GenAI builds, float weights."""
    from hanlin.backends.gguf.gguf_file import validate_gguf

    if not os.path.isfile(gguf_path):
        raise ModelError(f"{gguf_path} does not exist: export_openvino needs a float GGUF file")
    info = validate_gguf(gguf_path)  # ModelError with the reason for a truncated or corrupt file
    arch = info.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{os.path.basename(gguf_path)} is a {arch!r} model, and OpenVINO GenAI's GGUF reader builds only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models (it has no graph for any other architecture): "
            "export this model to ONNX (to='onnx') or run the GGUF with the gguf engine"
        )
    quantized = sorted({t.type_name for t in info.tensors if len(t.shape) >= 2 and t.type_name not in FLOAT_TYPES})
    if quantized:
        raise ValueError(
            f"{os.path.basename(gguf_path)} has {', '.join(quantized)} weights; export_openvino takes a float "
            "(F16/F32) GGUF so that f32/int8/int4 mean NNCF's compression of the float model: "
            "hanlin.export(model, out, to='openvino') writes that F16 GGUF first"
        )
    return info


def _need_libraries(quant: str) -> None:
    from hanlin.devices.tools import installed

    missing = [m for m in ("openvino", "openvino_genai") + (("nncf",) if quant != "f32" else ()) if not installed(m)]
    if missing:
        raise ModelError(f"the OpenVINO export needs {', '.join(missing)} (pip install -c constraints.txt 'hanlin[cpu]')")


# ---- the steps --------------------------------------------------------------------------


def _convert_with_genai(gguf_path: str, work: str) -> None:
    """GenAI's GGUF reader builds the model and saves openvino_model.xml/.bin and its tokenizer
    IR beside the GGUF it reads: give it a link inside `work` so that is where they land."""
    import openvino_genai

    os.makedirs(work)
    link = os.path.join(work, "model.gguf")
    try:
        os.symlink(os.path.abspath(gguf_path), link)
    except OSError:  # no symlinks here (some Windows setups): a hard link, else a copy
        try:
            os.link(gguf_path, link)
        except OSError:
            shutil.copyfile(gguf_path, link)
    try:
        pipe = openvino_genai.LLMPipeline(link, "CPU", enable_save_ov_model=True)
        del pipe  # it compiled the model to run it; only the saved files are wanted
    except RuntimeError as e:
        raise ValueError(f"OpenVINO GenAI could not convert {os.path.basename(gguf_path)}: {_first_line(e)}") from None
    finally:
        os.unlink(link)
    missing = [n for n in MODEL_FILES if not os.path.isfile(os.path.join(work, n))]
    if missing:
        raise ModelError(f"OpenVINO GenAI read the GGUF but saved no {', '.join(missing)}: this openvino-genai does not support enable_save_ov_model")


def _write_model(work: str, tmp: str, quant: str) -> dict[str, Any]:
    """Move (f32) or compress (int8, int4) the converted IR into tmp; a description of the weights."""
    if quant == "f32":
        for name in MODEL_FILES:
            os.replace(os.path.join(work, name), os.path.join(tmp, name))
        return {"weights": "float16 (the F16 GGUF's values); computed in float32"}
    import openvino as ov

    model = ov.Core().read_model(os.path.join(work, "openvino_model.xml"))
    model, described = _compress(model, quant)
    ov.save_model(model, os.path.join(tmp, "openvino_model.xml"), compress_to_fp16=True)
    return {"weights": described}


def _compress(model: Any, quant: str) -> tuple[Any, str]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    mode = nncf.CompressWeightsMode
    with _nncf_numpy_path(_n_weights(model) < SMALL_MODEL):
        if quant == "int8":
            return nncf.compress_weights(model, mode=mode.INT8_ASYM), "NNCF INT8_ASYM per output channel, every weight"
        adjust = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
        compressed = nncf.compress_weights(model, mode=mode.INT4_SYM, group_size=INT4_GROUP, ratio=1.0, advanced_parameters=adjust)
    return compressed, f"NNCF INT4_SYM group {INT4_GROUP} (smaller where a row is not a multiple); embedding/lm_head INT8_ASYM per channel"


def _n_weights(model: Any) -> int:
    """Elements in the model's constants: its size, near enough."""
    total = 0
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            n = 1
            for d in op.get_output_shape(0):
                n *= d
            total += n
    return total


@contextmanager
def _nncf_numpy_path(small: bool) -> Iterator[None]:
    """NNCF quantizes each weight with a small OpenVINO model it compiles for it, which pays
    off on big matrices; for a small model the 200-odd compilations are most of the time
    (SmolLM2-135M on 2 cores: int8 17.6 s vs 6.7 s, int4 23.5 s vs 14.3 s) and NNCF's numpy
    path writes byte-identical weights. Its switch is an environment variable, restored after."""
    key = "NNCF_DISABLE_OPTIMIZED_COMPRESSION"
    old = os.environ.get(key)
    if small:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _write_meta(folder: str, info: Any, quant: str, weights: dict[str, Any], gguf_path: str, tokenizer_from: str) -> None:
    """hanlin_openvino.json: what the folder is, for OpenVINOEngine and for a person reading it."""
    import openvino
    import openvino_genai

    md = info.metadata
    arch = info.architecture
    meta = {
        "format": "openvino",
        "quant": quant,
        **weights,
        "architecture": arch,
        "name": info.name,
        "context_length": info.context_length,
        "n_layers": md.get(f"{arch}.block_count"),
        "vocab_size": md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens") or ()) or None,
        "bos_token_id": info.bos_token_id,
        "eos_token_id": info.eos_token_id,
        "source": os.path.basename(gguf_path),
        "tokenizer_from": os.path.abspath(tokenizer_from),
        "converted_by": f"openvino-genai {openvino_genai.__version__} GGUF reader, openvino {openvino.__version__}",
        "stateful": True,
    }
    if quant != "f32":
        import nncf

        meta["converted_by"] += f", nncf {nncf.__version__}"
    with open(os.path.join(folder, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def _first_line(e: BaseException) -> str:
    """OpenVINO's exceptions carry a C++ trace; the last non-empty line is the message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
