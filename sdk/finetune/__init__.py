"""Fine-tuning: LoRA, QLoRA, full and DPO on the native PyTorch model, with a memory planner.

    from hanlin.finetune import FinetuneConfig, train, plan, merge
    result = train(FinetuneConfig(model="smollm2", data="facts.jsonl", out="runs/facts"))

The parts, each one file a person reads on its own:
- config.py   FinetuneConfig: every setting of a run (the CLI's flags)
- data.py     JSONL rows (alpaca, sharegpt, OpenAI messages; prompt/chosen/rejected for DPO)
              -> chat-template-rendered token ids with loss only on assistant tokens,
              packing with per-document attention, the validation split
- plan.py     the memory planner: predicted peak per part against the device's memory
- trainer.py  the loop: methods, optimizer, schedule, accumulation, clipping, checkpoints
              written atomically with everything --resume needs, log.jsonl, loss.png
- run_dir.py  what a run directory holds; chatting with its adapter; merging it
"""

from __future__ import annotations

from hanlin.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig"]


def train(cfg: FinetuneConfig, **kwargs):
    """Run one fine-tuning run (trainer.train): see FinetuneConfig for the settings."""
    from hanlin.finetune.trainer import train as _train

    return _train(cfg, **kwargs)


def plan_for(model: str | None, *, model_size: str | None = None, method: str = "lora", seq_len: int = 512, micro_batch: int = 4,
             grad_checkpoint: bool = False, optimizer: str = "adamw", lora_r: int = 8, lora_targets=("q_proj", "v_proj"),
             device: str = "auto", device_memory: str | int | None = None, device_kind: str | None = None, dtype: str = "auto"):  # fmt: skip
    """The memory plan without loading anything: for a model here, a catalogue name or a shape
    (model_size "7b"), on this device or on one described by device_memory (+ device_kind)."""
    from hanlin.finetune import plan as P

    shape = P.shape_for(model, model_size)
    if device_memory is not None:
        memory = device_memory if isinstance(device_memory, int) else P.parse_memory(device_memory)
        kind = device_kind or "cuda"
        name = f"--device-memory {memory / 2**30:.1f} GiB"
        dtypes: tuple[str, ...] = ()  # a device not here: on a CPU, auto is float32
    else:
        from hanlin.devices import get_device

        d = get_device(device)
        memory, kind, name, dtypes = d.memory_total, d.kind, d.label(), d.dtypes
    dtype = P.training_dtype(dtype, method, kind, dtypes)
    return P.plan(shape, method=method, seq_len=seq_len, micro_batch=micro_batch, grad_checkpoint=grad_checkpoint, optimizer=optimizer,
                  lora_r=lora_r, lora_targets=tuple(lora_targets), dtype=dtype, device_kind=kind, device_memory=memory, device_name=name)  # fmt: skip


def merge(run_dir: str, out: str, log=None) -> str:
    """Write a finished run's model (base + adapter merged, or the fully tuned weights) as an HF
    folder with the base's tokenizer and chat template: what `hanlin export` turns into a GGUF.
    Written beside OUT and renamed into place; an existing OUT is refused, never overwritten."""
    import os
    import shutil

    from hanlin.backends.base import ConfigError, ModelError
    from hanlin.backends.tokenizer import write_tokenizer_files
    from hanlin.backends.torch.lora import is_run_dir, load_run, read_run
    from hanlin.backends.torch.weights import save_hf_folder
    from hanlin.devices import get_device

    if not is_run_dir(run_dir):
        raise ModelError(f"{run_dir} is not a fine-tuning run directory (no hanlin_run.json)")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConfigError(f"finetune merge: {out} already exists; choose a new OUT (nothing is overwritten)")
    import torch

    from hanlin.finetune.trainer import transformers_fallback

    fallback = transformers_fallback(read_run(run_dir)["base_model"])
    if fallback:  # an architecture only transformers builds: merged by the hf engine
        from hanlin.backends.torch.hf import HFEngine

        model = HFEngine.load(run_dir, get_device("cpu"), dtype="float32").model
    else:
        model, _, _ = load_run(run_dir, get_device("cpu"), torch.float32)
    tmp = f"{out}.partial-{os.getpid()}"
    try:
        if fallback:
            model.save_pretrained(tmp)
        else:
            save_hf_folder(model, tmp)
        write_tokenizer_files(read_run(run_dir)["base_model"], tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"merged {run_dir} into {out}")
    return out


__all__ += ["train", "plan_for", "merge"]
