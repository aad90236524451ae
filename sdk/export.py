"""Export a model the native engine loads into the file a phone or a CPU runs.

    hanlin.export("smollm2-135m-instruct", "smol-q8.gguf", to="gguf", quant="Q8_0")

GGUF: the native engine's weights are written as a float GGUF (backends/torch/export_gguf.py),
then, for any other type, quantized by llama.cpp's own quantizer (backends/gguf/quantize.py).
The float file is an intermediate kept beside the output only until the quantizer is done.
Every file is written beside its destination and renamed into place, so an interrupted
export leaves nothing half-written at `out`.
"""

from __future__ import annotations

import os
import tempfile

from hanlin.backends.base import ConfigError
from hanlin.catalog import resolve

FORMATS = ("gguf",)


def export(model: str, out: str, *, to: str = "gguf", quant: str = "F16", tokenizer_from: str | None = None) -> str:
    """Write `model` (a catalogue name, a GGUF file or an HF folder) as `to` with weights `quant`.

    For GGUF the tokenizer and chat template come from a GGUF: the model itself when it is
    one, else `tokenizer_from` (e.g. the base model's GGUF for a fine-tuned HF folder)."""
    if to not in FORMATS:
        raise ConfigError(f"export format {to!r}: this version writes {', '.join(FORMATS)}")
    src = resolve(model)
    tok = tokenizer_from or (src.path if src.format == "gguf" else None)
    if tok is None:
        raise ConfigError(f"{src.path} is a {src.format} model: pass tokenizer_from= (a GGUF with the same tokenizer)")
    import torch

    from hanlin.backends.gguf.quantize import quant_type, quantize
    from hanlin.backends.torch.export_gguf import save_gguf
    from hanlin.backends.torch.weights import load_gguf, load_hf_folder

    try:  # ValueError: what the quantization, the model or the tokenizer file cannot do, in words
        key = quant_type(quant)  # checked before minutes of work, not after
        with torch.no_grad():
            weights = load_gguf(src.path) if src.format == "gguf" else load_hf_folder(src.path)
        if key in ("F32", "F16"):
            return save_gguf(weights, out, tokenizer_from=tok, ftype=key.lower())
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".hanlin-export-", dir=folder) as scratch:  # beside out: same disk
            # float32, not float16, as the quantizer's input: one rounding instead of two
            f32 = save_gguf(weights, os.path.join(scratch, "f32.gguf"), tokenizer_from=tok, ftype="f32")
            del weights
            return quantize(f32, out, key)
    except ValueError as e:
        raise ConfigError(str(e)) from e
