"""TrainConfig: every setting of a `hanlin train` run, read from YAML and checked before any
process starts.

    model:      init: scratch (a new model shaped by `arch`) or a model to continue from
                (a catalogue name, an HF folder or a GGUF file the native engine loads)
    data:       train: a shard folder from `hanlin data prepare`; seq_len
    optim:      AdamW: lr, min_lr, warmup_steps, weight_decay, betas, eps, grad_clip
    train:      steps, global_batch (sequences per optimizer step, all processes together),
                micro_batch (sequences per process per forward), seed, dtype, grad_checkpointing
    parallel:   strategy (none | ddp | zero1 | zero2 | zero3 | fsdp2 | auto), offload_optimizer,
                backend (auto follows the device: nccl on CUDA, hccl on Ascend, gloo on CPU)
    checkpoint: every, keep
    eval:       every, batches (held-out loss and perplexity)
    log:        every, tensorboard
    out:        the run folder (checkpoints/, log.jsonl, tensorboard/, config.yaml)

An unknown key is refused with its dotted name and the closest known one (a typo such as
`parallel.stratgy` would otherwise silently train with the default), and so is every
combination that cannot run (see `check`), so a cluster job fails at submission, not after
its processes have started.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from hanlin.backends.base import ConfigError

STRATEGIES = ("auto", "none", "ddp", "zero1", "zero2", "zero3", "fsdp2")
BACKENDS = ("auto", "nccl", "hccl", "gloo")
DTYPES = ("auto", "float32", "bfloat16")

# 11.8M parameters with the default model's 49,152-token vocabulary (the tied embedding is 9.4M of it)
TINY_ARCH = {"dim": 192, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2, "hidden_dim": 512, "tie_embeddings": True}
ARCH_KEYS = ("arch", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "norm_eps", "rope_theta",
             "tie_embeddings", "qkv_bias")


@dataclass
class ModelSection:
    init: str = "scratch"  # "scratch" or a model to continue pre-training from
    arch: dict[str, Any] = field(default_factory=lambda: dict(TINY_ARCH))  # ModelConfig fields (scratch only)
    quant: str = "none"  # "none" | "nf4": a 4-bit frozen base (LoRA-style training only; see check)


@dataclass
class DataSection:
    train: str = ""  # shard folder
    seq_len: int = 256
    heldout: str | None = None  # shard folder with a "heldout" split; default: data.train's own, if it has one


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class TrainSection:
    steps: int = 100
    global_batch: int = 16
    micro_batch: int = 4
    seed: int = 0
    device: str = "auto"  # auto (the best device found) | cpu | cuda | npu; each process takes its LOCAL_RANK-th
    dtype: str = "auto"  # auto: bfloat16 where the device computes it natively, else float32
    grad_checkpointing: bool = False


@dataclass
class ParallelSection:
    strategy: str = "auto"  # auto: none in one process, ddp in several
    offload_optimizer: bool = False  # ZeRO only: optimizer states in CPU memory (DeepSpeed's CPU Adam)
    backend: str = "auto"


@dataclass
class CheckpointSection:
    every: int = 50  # steps; 0 = only at the end
    keep: int = 2


@dataclass
class EvalSection:
    every: int = 50  # steps; 0 = never
    batches: int = 4


@dataclass
class LogSection:
    every: int = 1
    tensorboard: bool = True


@dataclass
class TrainConfig:
    out: str = "runs/train"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "TrainConfig":
        return _build(cls, raw, "", where)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(raw).__name__}")
        return cls.from_dict(raw, where=path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    # -- checking ------------------------------------------------------------------------

    def resolved_strategy(self, world_size: int) -> str:
        if self.parallel.strategy == "auto":
            return "none" if world_size == 1 else "ddp"
        return self.parallel.strategy

    def accumulation(self, world_size: int) -> int:
        return self.train.global_batch // (self.train.micro_batch * world_size)

    def check(self, world_size: int = 1) -> None:
        """Refuse what cannot run, naming the key. Called by `hanlin train` before it starts any
        process and again by every process before it joins the group."""
        t, o, p = self.train, self.optim, self.parallel

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{key}: {msg}")

        if not self.data.train:
            raise bad("data.train", "is required: a shard folder made by `hanlin data prepare`")
        for key, value, low in (("train.steps", t.steps, 1), ("train.global_batch", t.global_batch, 1),
                                ("train.micro_batch", t.micro_batch, 1), ("data.seq_len", self.data.seq_len, 2),
                                ("checkpoint.every", self.checkpoint.every, 0), ("checkpoint.keep", self.checkpoint.keep, 1),
                                ("eval.every", self.eval.every, 0), ("eval.batches", self.eval.batches, 1),
                                ("log.every", self.log.every, 1), ("optim.warmup_steps", o.warmup_steps, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(key, f"must be an integer >= {low}, got {value!r}")
        if not o.lr > 0 or not 0 <= o.min_lr <= o.lr:
            raise bad("optim.lr", f"needs lr > 0 and 0 <= min_lr <= lr (lr={o.lr}, min_lr={o.min_lr})")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise bad("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
        if o.grad_clip < 0 or o.weight_decay < 0:
            raise bad("optim.grad_clip" if o.grad_clip < 0 else "optim.weight_decay", "must be >= 0")
        for key, value, allowed in (("parallel.strategy", p.strategy, STRATEGIES), ("parallel.backend", p.backend, BACKENDS),
                                    ("train.dtype", t.dtype, DTYPES), ("train.device", t.device, ("auto", "cpu", "cuda", "npu")), ("model.quant", self.model.quant, ("none", "nf4"))):
            if value not in allowed:
                raise bad(key, f"{value!r} is not one of {', '.join(allowed)}")
        if world_size < 1:
            raise bad("world size", f"must be >= 1, got {world_size}")
        per_step = t.micro_batch * world_size
        if t.global_batch % per_step:
            raise bad("train.global_batch", f"{t.global_batch} is not a multiple of micro_batch x world size "
                      f"({t.micro_batch} x {world_size} = {per_step}): every process must take the same number of "
                      "micro-batches per step")
        strategy = self.resolved_strategy(world_size)
        if strategy == "none" and world_size > 1:
            raise bad("parallel.strategy", f"'none' runs one process, but the world size is {world_size} (use ddp, zero1-3 or fsdp2)")
        if p.offload_optimizer and not strategy.startswith("zero"):
            raise bad("parallel.offload_optimizer", f"needs a ZeRO strategy (zero1, zero2, zero3), not {strategy!r}")
        if self.model.quant == "nf4":
            if strategy in ("zero3", "fsdp2"):
                raise bad("model.quant", f"a 4-bit (nf4) base cannot be sharded by {strategy}: its packed uint8 weights are "
                          "not trainable parameters that ZeRO-3 or FSDP2 can partition and gather (use zero1/zero2/ddp, "
                          "or a float base)")
            raise bad("model.quant", "nf4 trains adapters on a frozen base; that is `hanlin finetune --method qlora`, "
                      "not pre-training (set model.quant: none)")
        if self.model.init == "scratch":
            unknown = sorted(set(self.model.arch) - set(ARCH_KEYS))
            if unknown:
                raise bad(f"model.arch.{unknown[0]}", _unknown_hint(unknown[0], ARCH_KEYS))
        elif self.model.arch != TINY_ARCH:
            raise bad("model.arch", f"only applies to init: scratch; a model continued from {self.model.init!r} keeps its own shape")


def _unknown_hint(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; known: {', '.join(known)}"


def _build(cls, raw: Any, prefix: str, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: {name}: {_unknown_hint(str(key), fields)}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value if value is not None else {}, f"{name}.", where)
        elif key == "arch":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a mapping of model shape fields")
            kwargs[key] = {**TINY_ARCH, **value}
        else:
            kwargs[key] = _coerce(value, default, name, where)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str, where: str) -> Any:
    """YAML gives the right types except floats in exponent form ("3e-4" is a string in YAML 1.1)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be a list of numbers, got {value!r}") from None
    if default is None or isinstance(default, str):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
        return value
    return value
