"""Export a model the native engine loads into the file a phone or a CPU runs.

    hanlin.export("smollm2-135m-instruct", "smol-q8.gguf", to="gguf", quant="Q8_0")
    hanlin.export("smollm2-135m-instruct", "smol-onnx-int4", to="onnx", quant="int4")
    hanlin.export("smollm2-135m-instruct", "smol-ov-int8", to="openvino", quant="int8")

GGUF: the native engine's weights are written as a float GGUF (backends/torch/export_gguf.py),
then, for any other type, quantized by llama.cpp's own quantizer (backends/gguf/quantize.py).
ONNX: the native engine's weights traced by torch.onnx.export into a graph with the KV cache
as inputs/outputs; weights as onnxruntime's MatMulNBits: int8 by onnxruntime's own quantizer,
int4 in llama.cpp's Q4_1 layout (a float offset per block), int4-gptq by GPTQ (calibrated on
`calibration`, a text file, or on text the model writes itself; backends/cpu/gptq.py), see
backends/cpu/onnx_export.py; the output is a folder with the tokenizer beside the graph.
OpenVINO: from a float GGUF written as above, read by OpenVINO GenAI and weight-compressed by
NNCF (backends/cpu/openvino_export.py); a folder too.

Every file and folder is written beside its destination and renamed into place, so an
interrupted export leaves nothing half-written at `out`.
"""

from __future__ import annotations

import os
import tempfile

from hanlin.backends.base import ConfigError
from hanlin.catalog import resolve

# format -> the weight types it takes (GGUF: F16/F32 here, the rest whatever llama.cpp knows)
QUANTS = {
    "gguf": ("F16", "F32", "Q8_0", "Q4_0", "Q4_1", "Q5_K_M", "Q4_K_M", "..."),
    "onnx": ("fp32", "int8", "int4", "int4-gptq", "int4-rtn", "int4-hqq"),
    "openvino": ("f32", "int8", "int4"),
}
FORMATS = tuple(QUANTS)
DEFAULT_QUANT = {"gguf": "F16", "onnx": "int4", "openvino": "int8"}


def export(model: str, out: str, *, to: str = "gguf", quant: str | None = None, tokenizer_from: str | None = None,
           calibration: str | None = None, log=None) -> str:  # fmt: skip
    """Write `model` (a catalogue name, a GGUF file or an HF folder) as `to` with weights `quant`.

    For GGUF the tokenizer and chat template come from a GGUF: the model itself when it is
    one, else `tokenizer_from` (e.g. the base model's GGUF for a fine-tuned HF folder). ONNX and
    OpenVINO folders carry tokenizer.json, converted from the GGUF or copied from the folder."""
    if to not in FORMATS:
        raise ConfigError(f"export format {to!r} is unknown: hanlin writes {', '.join(FORMATS)}")
    quant = quant or DEFAULT_QUANT[to]
    if to != "gguf" and quant.lower() not in QUANTS[to]:
        raise ConfigError(f"{to} export does not take quant={quant!r}: use one of {', '.join(QUANTS[to])}")
    if calibration is not None and (to, quant.lower()) != ("onnx", "int4-gptq"):
        raise ConfigError(f"a calibration text is for ONNX int4-gptq; {to} {quant} does not use one")
    if calibration is not None and not os.path.isfile(calibration):
        raise ConfigError(f"calibration text {calibration!r} is not a file")
    src = resolve(model)
    tok = tokenizer_from or src.path
    if to in ("gguf", "openvino") and src.format != "gguf" and tokenizer_from is None:  # OpenVINO goes through a GGUF
        raise ConfigError(f"{src.path} is a {src.format} model: pass tokenizer_from= (a GGUF with the same tokenizer)")
    try:  # ValueError: what the quantization, the model or the tokenizer file cannot do, in words
        if to == "gguf":
            return _to_gguf(src, out, quant, tok)
        if to == "onnx":
            from hanlin.backends.cpu.onnx_export import export_onnx

            return export_onnx(_load_weights(src), out, quant=quant.lower(), tokenizer_from=tok, calibration=calibration, log=log)
        from hanlin.backends.cpu.openvino_export import export_openvino

        with _scratch(out) as scratch:  # OpenVINO reads the model from a float GGUF
            f16 = _to_gguf(src, os.path.join(scratch, "f16.gguf"), "F16", tok)
            return export_openvino(f16, out, quant=quant.lower(), tokenizer_from=tok)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _load_weights(src):
    import torch

    from hanlin.backends.torch.weights import load_gguf, load_hf_folder

    with torch.no_grad():
        return load_gguf(src.path) if src.format == "gguf" else load_hf_folder(src.path)


def _scratch(out: str):
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".hanlin-export-", dir=folder)  # beside out: same disk


def _to_gguf(src, out: str, quant: str, tok: str) -> str:
    from hanlin.backends.gguf.quantize import quant_type, quantize
    from hanlin.backends.torch.export_gguf import save_gguf

    key = quant_type(quant)  # checked before minutes of work, not after
    weights = _load_weights(src)
    if key in ("F32", "F16"):
        return save_gguf(weights, out, tokenizer_from=tok, ftype=key.lower())
    with _scratch(out) as scratch:
        # float32, not float16, as the quantizer's input: one rounding instead of two
        f32 = save_gguf(weights, os.path.join(scratch, "f32.gguf"), tokenizer_from=tok, ftype="f32")
        del weights
        return quantize(f32, out, key)
