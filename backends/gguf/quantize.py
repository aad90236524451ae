"""GGUF quantization by llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python).

The types are whatever the installed llama.cpp knows (its LLAMA_FTYPE_MOSTLY_* constants), so a
newer llama.cpp brings its new types without a change here; an unknown name is refused with the
list. Why llama.cpp's quantizer and not our own: its choices per tensor (Q4_K_M keeps some
tensors at 6 bits, falls back where a row is not a multiple of the 256-value super-block) are
what every GGUF user expects a "Q4_K_M" to mean.

The output is written beside `out` and renamed into place: an interrupted or failed run leaves
nothing at `out`.
"""

from __future__ import annotations

import ctypes
import os

from hanlin.backends.files import written_at

_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def quant_types() -> dict[str, int]:
    """Quantization types the installed llama.cpp writes: name (e.g. "Q4_K_M") -> its ftype."""
    import llama_cpp as L

    types = {n[len(_PREFIX) :]: getattr(L, n) for n in dir(L) if n.startswith(_PREFIX)}
    types["F32"] = L.LLAMA_FTYPE_ALL_F32
    return dict(sorted(types.items()))


def quant_type(qtype: str) -> str:
    """`qtype` as llama.cpp names it (any case accepted), or a ValueError listing the known ones."""
    types = quant_types()
    if qtype.upper() not in types:
        raise ValueError(f"unknown GGUF quantization {qtype!r}; the installed llama.cpp writes: {', '.join(types)}")
    return qtype.upper()


def quantize(src: str, out: str, qtype: str, *, threads: int | None = None) -> str:
    """Quantize the GGUF `src` (float or already quantized) to `qtype`, written at `out`."""
    import llama_cpp as L
    from llama_cpp._utils import suppress_stdout_stderr

    key = quant_type(qtype)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no GGUF file at {src}")
    params = L.llama_model_quantize_default_params()
    params.ftype = quant_types()[key]
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True
    with written_at(out, prefix=".hanlin-quant-", suffix=".gguf") as tmp:
        with suppress_stdout_stderr(disable=False):  # llama.cpp prints every tensor it converts
            rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {key} (llama_model_quantize returned {rc})")
    return os.path.abspath(out)
