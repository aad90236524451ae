"""hanlin: one SDK for a language model's whole life, from a phone to a cluster.

    import hanlin
    llm = hanlin.load()                          # SmolLM2-135M-Instruct, best device and engine
    print(llm.chat([{"role": "user", "content": "Hello!"}]).text)

`import hanlin` is cheap and imports no vendor library (torch, llama_cpp, onnxruntime, ...):
the names below are loaded on first use (PEP 562), and each engine imports its library only
when it loads a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "hanlin.llm",
    "LLM": "hanlin.llm",
    "Completion": "hanlin.llm",
    "export": "hanlin.export",
    "Stream": "hanlin.llm",
    "GenerationConfig": "hanlin.backends.base",
    "TokenEvent": "hanlin.backends.base",
    "HanlinError": "hanlin.backends.base",
    "ConfigError": "hanlin.backends.base",
    "ModelError": "hanlin.backends.base",
    "DeviceError": "hanlin.backends.base",
    "ContextOverflowError": "hanlin.backends.base",
    "EngineUnavailable": "hanlin.backends.base",
    "registered_engines": "hanlin.backends.base",
    "Device": "hanlin.devices",
    "detect_devices": ("hanlin.devices", "detect"),
    "get_device": "hanlin.devices",
    "CATALOG": "hanlin.catalog",
    "DEFAULT_MODEL": "hanlin.catalog",
    "list_models": "hanlin.catalog",
    "pull": "hanlin.catalog",
    "resolve": "hanlin.catalog",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'hanlin' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for editors and type checkers only
    from hanlin.backends.base import (  # noqa: F401
        ConfigError,
        ContextOverflowError,
        DeviceError,
        EngineUnavailable,
        GenerationConfig,
        HanlinError,
        ModelError,
        TokenEvent,
        registered_engines,
    )
    from hanlin.catalog import CATALOG, DEFAULT_MODEL, list_models, pull, resolve  # noqa: F401
    from hanlin.devices import Device, get_device  # noqa: F401
    from hanlin.devices import detect as detect_devices  # noqa: F401
    from hanlin.llm import LLM, Completion, Stream, load  # noqa: F401
