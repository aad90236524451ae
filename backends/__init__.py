"""Engines that run a model, one folder per target (see DESIGN.md).

`base` holds the Engine protocol, the registry and auto-selection. Each subpackage
registers its engine on import without importing its vendor library; the library is
imported when the engine is loaded.
"""

from hanlin.backends.base import (  # noqa: F401
    Capabilities,
    ConfigError,
    ContextOverflowError,
    DeviceError,
    Engine,
    EngineUnavailable,
    GenerationConfig,
    HanlinError,
    ModelError,
    Selection,
    TokenEvent,
    detect_format,
    get_engine,
    register,
    registered_engines,
    select_engine,
)
