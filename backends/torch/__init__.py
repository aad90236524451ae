"""The native PyTorch engine: one readable Transformer (model.py), its weights (weights.py)
and generation with a static KV cache (generate.py). Importing this package registers the
engine; torch itself is imported when a model is loaded."""

from hanlin.backends.torch.engine import TorchEngine  # noqa: F401
from hanlin.backends.torch.hf import HFEngine  # noqa: F401
