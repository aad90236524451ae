"""CPU engines beyond llama.cpp: ONNX Runtime and OpenVINO, and the numba helpers.

Importing this package registers the engines; onnxruntime, openvino and numba themselves are
imported only when an engine loads or a helper runs.
"""

from hanlin.backends.cpu import onnx_engine  # noqa: F401
from hanlin.backends.cpu import openvino_engine  # noqa: F401
