"""The llama.cpp engine (llama-cpp-python): laptops, phones, GPU offload.

Importing this package registers the engine; llama_cpp itself is imported on load.
"""

from hanlin.backends.gguf.engine import GGUFEngine  # noqa: F401
