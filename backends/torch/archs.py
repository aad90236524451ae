"""The Hugging Face architectures the native Transformer builds (read without importing torch,
so engine selection can ask before anything heavy is loaded)."""

from __future__ import annotations

import json
import os

SUPPORTED_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "InternLM2ForCausalLM": "internlm2",
}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "internlm2": "internlm2"}


def native_arch(cfg: dict) -> str | None:
    """'llama', 'qwen2' or 'internlm2' for a config.json the native model builds, else None."""
    for a in cfg.get("architectures") or []:
        if a in SUPPORTED_ARCHS:
            return SUPPORTED_ARCHS[a]
    return MODEL_TYPES.get(cfg.get("model_type", ""))


def why_not_native(folder: str) -> str | None:
    """None when the folder's config.json is an architecture the native model builds."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # the loader reports a missing or broken config.json precisely
    if native_arch(cfg):
        return None
    name = ", ".join(cfg.get("architectures") or [str(cfg.get("model_type"))])
    return f"architecture {name} is not built natively (native: {', '.join(sorted(SUPPORTED_ARCHS))})"
