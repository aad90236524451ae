"""The process group and the data-parallel strategies, each behind the same five calls:

    runner.micro(tokens, targets, last, accumulation) -> this micro-batch's mean loss (forward
                                     and backward; gradients sync on the step's last one)
    runner.step(lr) -> grad norm     clip, optimizer step, zero the gradients
    runner.save(folder) / runner.load(folder)
    runner.full_state() -> the whole model's state dict on rank 0 (for the final HF folder)

- none:  one process.
- ddp:   torch DistributedDataParallel; gradients all-reduced on the last micro-batch only.
- fsdp2: torch's fully_shard per block and at the root: parameters, gradients and optimizer
         state sharded across ranks (DTensor); checkpoints through torch.distributed.checkpoint.
- zero1/zero2/zero3: DeepSpeed ZeRO stages (optimizer states / + gradients / + parameters
         partitioned); optional optimizer offload to CPU (DeepSpeed's CPU Adam, compiled on first
         use). DeepSpeed saves and loads its own sharded checkpoints.

The loss is computed inside the wrapped module's forward (`LMLoss`), so a sharded strategy sees
the lm_head weight used in that forward: FSDP2 keeps the root's parameters unsharded for the
whole root forward, and ZeRO-3 is told about it with `register_external_parameter`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from hanlin.backends.base import ConfigError
from hanlin.backends.torch.losses import linear_logprob

LOSS_CHUNK = 1024  # rows of logits alive at once in the loss (see losses.py)


class LMLoss(nn.Module):
    """Causal-LM loss around the native Transformer: tokens (B, T) and targets (B, T) -> mean NLL."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.model(tokens, hidden_only=True)  # (B, T, C)
        h, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
        weight = self.model.lm_head.weight  # (V, C)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], LOSS_CHUNK):
            total = total - linear_logprob(h[i: i + LOSS_CHUNK], weight, y[i: i + LOSS_CHUNK]).sum()
        return total / y.numel()


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def backend_for(kind: str, asked: str) -> str:
    """The collective library follows the device unless the config names one."""
    if asked != "auto":
        return asked
    return {"cuda": "nccl", "npu": "hccl"}.get(kind, "gloo")


def init_process_group(kind: str, asked_backend: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(kind, asked_backend)
    if backend == "hccl":
        import torch_npu  # noqa: F401  (registers the NPU device and the hccl backend)
    if not dist.is_initialized():
        # torchrun restarts a failed worker group with the same agent store; the default group's
        # keys (every rank's address) would be the dead processes' and the new group's connect is
        # refused (pytorch/pytorch#167288). A prefix per restart keeps each group's keys its own.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"hanlin/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local_rank, world=world, backend=backend)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    if info.world > 1:
        import torch.distributed as dist

        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= info.world
    return float(value)


def adamw(params, cfg) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norms and biases are not decayed: nanoGPT, Llama)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, foreach=False)


def _autocast(device: torch.device, dtype: torch.dtype):
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class TorchRunner:
    """none, ddp and fsdp2: torch's own data parallelism."""

    def __init__(self, model: nn.Module, cfg, strategy: str, info: DistInfo, device: torch.device, dtype: torch.dtype):
        self.cfg, self.strategy, self.info, self.device, self.dtype = cfg, strategy, info, device, dtype
        self.inner = model
        net = LMLoss(model).to(device)
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net, device_ids=[device.index] if device.type != "cpu" else None)
        elif strategy == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            for block in model.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(net, mp_policy=mp)
        self.net = net
        self.optimizer = adamw(net.parameters(), cfg)

    def micro(self, tokens, targets, last: bool, accumulation: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are synchronised on the last one
        only (DDP's no_sync, FSDP2's requires_gradient_sync)."""
        import contextlib

        if self.strategy == "fsdp2":
            self.net.set_requires_gradient_sync(last)
        skip_sync = self.net.no_sync() if self.strategy == "ddp" and not last else contextlib.nullcontext()
        # FSDP2 casts through its MixedPrecisionPolicy; the others through autocast
        cast = _autocast(self.device, self.dtype if self.strategy != "fsdp2" else torch.float32)
        with skip_sync, cast:
            loss = self.net(tokens, targets)
            (loss / accumulation).backward()
        return loss.detach()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip, foreach=False)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def _module(self) -> nn.Module:
        """The LMLoss module itself (DDP wraps it; none and FSDP2 do not)."""
        return self.net.module if self.strategy == "ddp" else self.net

    @torch.no_grad()
    def evaluate(self, tokens, targets) -> torch.Tensor:
        with _autocast(self.device, self.dtype if self.strategy != "fsdp2" else torch.float32):
            return self.net(tokens, targets)

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, folder: str) -> None:
        state_dir = os.path.join(folder, "state")
        if self.strategy == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.net, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=state_dir)
            return
        if self.info.main:
            os.makedirs(state_dir, exist_ok=True)
            torch.save({"model": self._module.state_dict(), "optim": self.optimizer.state_dict()}, os.path.join(state_dir, "state.pt"))

    def load(self, folder: str) -> None:
        state_dir = os.path.join(folder, "state")
        if self.strategy == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.net, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=state_dir)
            set_state_dict(self.net, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            return
        state = torch.load(os.path.join(state_dir, "state.pt"), map_location=self.device, weights_only=True)
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])

    def full_state(self) -> dict[str, torch.Tensor] | None:
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return _inner_state(sd) if self.info.main else None
        return _inner_state(self._module.state_dict()) if self.info.main else None


def _inner_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LMLoss's keys ('model.layers.0...') -> the Transformer's own."""
    return {k[len("model."):]: v.detach().cpu() for k, v in sd.items() if k.startswith("model.")}


class DeepSpeedRunner:
    """zero1, zero2, zero3 through a DeepSpeed engine (the engine accumulates and clips)."""

    def __init__(self, model: nn.Module, cfg, strategy: str, info: DistInfo, device: torch.device, dtype: torch.dtype,
                 accumulation: int):
        os.environ.setdefault("DS_ACCELERATOR", {"cuda": "cuda", "npu": "npu"}.get(device.type, "cpu"))
        try:
            import deepspeed
        except ImportError as e:
            raise ConfigError(f"parallel.strategy {strategy} needs DeepSpeed ({e}); pip install deepspeed, "
                              "or use ddp / fsdp2") from None
        self.cfg, self.strategy, self.info, self.device = cfg, strategy, info, device
        stage = int(strategy[-1])
        zero: dict = {"stage": stage}
        ds_cfg: dict = {
            "train_batch_size": cfg.train.global_batch,
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,  # our log, not DeepSpeed's
            "wall_clock_breakdown": False,
        }
        net = LMLoss(model)
        if cfg.parallel.offload_optimizer:
            # ZeRO-Offload: optimizer states and the update on the CPU, by DeepSpeed's CPU Adam
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type != "cpu"}
            ds_cfg["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                               "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}}
            optimizer = None
        else:
            # torch's AdamW runs everywhere (DeepSpeed's fused Adam needs a GPU build)
            ds_cfg["zero_allow_untested_optimizer"] = True
            ds_cfg["zero_force_ds_cpu_optimizer"] = False
            optimizer = adamw(net.parameters(), cfg)
        if stage == 3:
            deepspeed.zero.register_external_parameter(net, model.lm_head.weight)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_cfg,
                                                                 model_parameters=None if optimizer else net.parameters())
        self.inner = model

    def micro(self, tokens, targets, last: bool, accumulation: int) -> torch.Tensor:
        loss = self.engine(tokens, targets)
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # DeepSpeed counts micro-steps; it updates only at the boundary (in step())
        return loss.detach()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def evaluate(self, tokens, targets) -> torch.Tensor:
        return self.engine(tokens, targets)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag="state")

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag="state")
        if path is None:
            raise ConfigError(f"DeepSpeed could not load the checkpoint in {folder}")

    def full_state(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.strategy == "zero3"):
            sd = _inner_state(self.engine.module.state_dict()) if self.info.main else None
        return sd


def make_runner(model, cfg, strategy: str, info: DistInfo, device, dtype, accumulation: int):
    if strategy.startswith("zero"):
        return DeepSpeedRunner(model, cfg, strategy, info, device, dtype, accumulation)
    return TorchRunner(model, cfg, strategy, info, device, dtype)
