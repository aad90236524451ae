"""Fine-tuning run directories as models: `hanlin chat --model RUN_DIR` and merging.

A run directory (written by hanlin.finetune) holds hanlin_run.json (the base model's path and
the method) and either adapter/ (LoRA weights in peft's file layout: adapter_config.json and
adapter_model.safetensors, keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
the transformers model's module names under peft's prefix, so peft's PeftModel.from_pretrained
loads it onto the base as transformers builds it) or model/
(an HF folder: full fine-tuning). Loading one builds the base model and adds each adapter's
update into the weight it adapts, W += (alpha / r) * B @ A: the merged model is an ordinary
native Transformer, so generation runs at the base model's speed and needs no peft.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hanlin.backends.base import ModelError

RUN_FILE = "hanlin_run.json"
PEFT_PREFIX = "base_model.model."  # peft's prefix for adapter keys (PeftModel -> LoraModel -> the model)
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, RUN_FILE))


def run_base(path: str) -> str | None:
    """The base model a run directory names (unchecked: read_run checks it)."""
    try:
        with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
            return json.load(f).get("base_model")
    except (OSError, ValueError):
        return None


def read_run(path: str) -> dict[str, Any]:
    """hanlin_run.json, checked: a finished run whose outputs and base model are here."""
    try:
        with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read {RUN_FILE}: {e}") from None
    if run.get("status") != "done":
        raise ModelError(f"{path} is a fine-tuning run that has not finished (status {run.get('status')!r}): "
                         "resume it with `hanlin finetune ... --out {path} --resume`")  # fmt: skip
    base = run.get("base_model")
    if not base or not os.path.exists(base):
        raise ModelError(f"{path}: the run's base model {base!r} is not on this machine; the adapter needs it")
    out = os.path.join(path, MODEL_DIR if run.get("method") == "full" else ADAPTER_DIR)
    if not os.path.isdir(out):
        raise ModelError(f"{path}: the run says it finished but {os.path.basename(out)}/ is missing")
    return run


def merge_lora(model: Any, adapter_dir: str) -> int:
    """Add a LoRA adapter's update into the native model's weights, in place; return how many
    linears were updated. Refuses an adapter whose layers or shapes this model does not have."""
    import torch
    from safetensors.torch import load_file

    from hanlin.backends.torch.weights import native_name

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    merged = 0
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        b = state.get(f"{stem}.lora_B.weight")
        name = stem.removeprefix(PEFT_PREFIX)
        if name not in modules:  # the native Transformer's names lack transformers' "model." level
            name = native_name(name)
        lin = modules.get(name)
        if b is None or lin is None or not isinstance(lin, torch.nn.Linear):
            raise ModelError(f"{adapter_dir}: adapter layer {name!r} has no matching linear in this model (or no lora_B)")
        delta = (b.float() @ a.float()) * scale  # (out, r) @ (r, in) -> (out, in)
        if delta.shape != lin.weight.shape:
            raise ModelError(f"{adapter_dir}: {name} update is {tuple(delta.shape)} but the model's weight is {tuple(lin.weight.shape)}")
        with torch.no_grad():
            lin.weight += delta.to(device=lin.weight.device, dtype=lin.weight.dtype)
        merged += 1
    if not merged:
        raise ModelError(f"{adapter_dir}: no LoRA weights in adapter_model.safetensors")
    return merged


def load_run(path: str, device: Any, dtype: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) of a finished run: the base with the adapter merged, or the fully
    fine-tuned weights; the tokenizer and chat template always come from the base model."""
    from hanlin.backends.torch import weights
    from hanlin.backends.torch.engine import load_parts

    run = read_run(path)
    model, tok, meta = load_parts(run["base_model"], device, dtype)
    if run["method"] == "full":
        tuned = weights.load_hf_folder(os.path.join(path, MODEL_DIR), dtype=dtype, device=next(model.parameters()).device)
        model = tuned
    else:
        merge_lora(model, os.path.join(path, ADAPTER_DIR))
    meta = dict(meta, name=os.path.basename(path.rstrip("/")), base_model=run["base_model"], method=run["method"])
    return model, tok, meta
