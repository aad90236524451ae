"""The settings of one fine-tuning run: one dataclass, every field a `hanlin finetune` flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hanlin.backends.base import ConfigError

METHODS = ("lora", "qlora", "full", "dpo")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class FinetuneConfig:
    model: str  # a .gguf file, an HF folder, or a catalogue name
    data: str  # a JSONL file: alpaca, sharegpt or OpenAI `messages` rows; prompt/chosen/rejected for dpo
    out: str  # the run directory: checkpoints, adapter, log.jsonl, loss.png
    method: str = "lora"
    device: str = "auto"
    seq_len: int = 512  # tokens per packed sequence
    micro_batch: int = 4  # sequences per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; wins over epochs
    lr: float | None = None  # None: 2e-4 for adapters, 2e-5 for full, 5e-6 for dpo's full... (see trainer)
    schedule: str = "cosine"
    warmup: float = 0.03  # < 1: a fraction of the steps; >= 1: a step count
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    grad_checkpoint: bool = False
    packing: bool = True
    val_fraction: float = 0.05
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    seed: int = 0
    on_bad_row: str = "skip"  # "skip" (report with line number) | "stop"
    dpo_beta: float = 0.1
    release_memory: bool = True  # CPU: glibc returns freed activations to the system (see trainer.return_freed_memory)
    dtype: str = "auto"  # "auto" (bfloat16 where the device computes it fast, else float32) | "float32" | "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        def bad(name: str, value: Any, rule: str) -> ConfigError:
            return ConfigError(f"finetune: {name}={value!r} is not valid: {rule}")

        if self.method not in METHODS:
            raise bad("method", self.method, f"choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        for name in ("seq_len", "micro_batch", "grad_accum", "lora_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "a positive integer")
        if self.seq_len < 16:
            raise bad("seq_len", self.seq_len, "at least 16 tokens")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", self.max_steps, "a positive integer")
        if not self.epochs > 0:
            raise bad("epochs", self.epochs, "a positive number")
        if self.lr is not None and not self.lr > 0:
            raise bad("lr", self.lr, "a positive number")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", self.val_fraction, "in [0, 1)")
        if self.on_bad_row not in ("skip", "stop"):
            raise bad("on_bad_row", self.on_bad_row, "'skip' or 'stop'")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise bad("dtype", self.dtype, "'auto', 'float32' or 'bfloat16'")
        if self.save_every < 0:
            raise bad("save_every", self.save_every, "0 or a positive integer")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d
