"""The pre-training loop: one function every process runs (`run`), the same in one process,
under torchrun and under the deepspeed launcher.

Data order is a pure function of (seed, step): the shard stream is cut into windows of
seq_len + 1 tokens (inputs and shifted targets), each epoch visits them in a permutation
seeded by (seed, epoch), and optimizer step s takes global samples [s x G, (s + 1) x G) of
that order (G = train.global_batch). Rank r's micro-batch a of a step is samples
(a x W + r) x M ... + M - 1 of the step (W processes, M = micro_batch). So:
- the loss of a step is the mean over the same G sequences whatever W is, and one process and
  two processes follow the same loss curve (tests/test_train.py measures how closely);
- a resumed run needs no sampler state: it restarts at the checkpoint's step and sees exactly
  the batches the uninterrupted run saw.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from hanlin.backends.base import ConfigError
from hanlin.backends.torch.engine import as_torch_device
from hanlin.train import checkpoint as C
from hanlin.train.config import TrainConfig
from hanlin.train.shards import TokenShards


class Windows:
    """Fixed-length training windows over one split's token stream, in a seeded order."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.count = (shards.tokens - 1) // seq_len  # windows of seq_len + 1 tokens, stride seq_len
        if self.count < 1:
            raise ConfigError(f"data.train: {shards.folder} holds {shards.tokens} tokens, fewer than one window of "
                              f"data.seq_len + 1 = {seq_len + 1}")
        self._epoch, self._perm = -1, None

    def window(self, i: int):
        """Window i in stream order -> (seq_len + 1,) int64."""
        return self.shards.window(i * self.seq_len, self.seq_len + 1)

    def sample(self, g: int):
        """The g-th sample of the infinite, epoch-by-epoch shuffled order -> (seq_len + 1,) int64."""
        import numpy as np

        epoch, i = divmod(g, self.count)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self._epoch = epoch
        return self.window(int(self._perm[i]))

    def batch(self, first: int, n: int, device, *, shuffled: bool = True):
        """Samples first .. first + n - 1 (of the shuffled order, or windows in stream order) as
        (inputs, targets), each (n, seq_len)."""
        import numpy as np
        import torch

        pick = self.sample if shuffled else self.window
        rows = torch.from_numpy(np.stack([pick(first + k) for k in range(n)]))  # (n, T + 1)
        return rows[:, :-1].to(device), rows[:, 1:].to(device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step (step is 0-based)."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    out: str
    steps: int  # the last step done
    resumed_from: int  # 0 = a fresh start
    final_loss: float | None
    heldout_loss: float | None
    tokens: int


def _device(kind: str, local_rank: int):
    from hanlin.devices import detect, get_device

    if kind == "auto":
        best = detect().best()
        kind = best.kind
    dev = get_device("cpu" if kind == "cpu" else f"{kind}:{local_rank}")
    if dev.kind == "npu":
        import torch_npu  # noqa: F401  (registers the "npu" device type with torch)
    if dev.kind in ("cuda", "npu"):
        import torch

        getattr(torch, dev.kind).set_device(dev.index)  # one device per process, before the group forms
    return dev


def _dtype(cfg: TrainConfig, dev) -> Any:
    import torch

    if cfg.train.dtype == "float32":
        return torch.float32
    if cfg.train.dtype == "bfloat16":
        if "bfloat16" not in dev.dtypes:
            raise ConfigError(f"train.dtype: {dev.label()} does not compute bfloat16 (it has {', '.join(dev.dtypes)})")
        return torch.bfloat16
    # auto: bfloat16 on accelerators that have it; float32 on CPUs, where bf16 matmuls are
    # emulated on most parts and the loss curves are compared to float32 runs
    return torch.bfloat16 if dev.kind != "cpu" and "bfloat16" in dev.dtypes else torch.float32


def build_model(cfg: TrainConfig, shards: TokenShards, seed: int):
    """A new model (init: scratch) shaped by model.arch, or one loaded to continue pre-training."""
    import torch

    from hanlin.backends.torch.model import ModelConfig, Transformer

    if cfg.model.init == "scratch":
        arch = dict(cfg.model.arch)
        mc = ModelConfig(vocab_size=shards.vocab_size, max_seq_len=max(cfg.data.seq_len, 2048), eos_token_id=shards.eos_id, **arch)
        torch.manual_seed(seed)
        model = Transformer(mc)
        init_weights(model)
        return model
    from hanlin import catalog
    from hanlin.backends.torch.engine import load_parts
    from hanlin.devices import get_device

    src = catalog.resolve(cfg.model.init)
    model, _tok, meta = load_parts(str(src.path), get_device("cpu"), torch.float32)
    if model.config.vocab_size < shards.vocab_size:
        raise ConfigError(f"model.init: {cfg.model.init} has a {model.config.vocab_size}-token vocabulary; the shards in "
                          f"{shards.folder} use {shards.vocab_size} (prepare them with this model's tokenizer)")
    return model


def init_weights(model) -> None:
    """GPT-2 / nanoGPT initialisation: N(0, 0.02), output projections scaled by 1/sqrt(2 x layers)."""
    import torch
    from torch import nn

    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norms keep their ones, biases their zeros
        s = std / math.sqrt(2 * model.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        nn.init.normal_(p, mean=0.0, std=s)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def run(cfg: TrainConfig, *, resume: str = "never", log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) on this process's share; every process of the job calls this."""
    import torch

    from hanlin.train import metrics as M
    from hanlin.train import parallel as P

    dev = _device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = P.init_process_group(dev.kind, cfg.parallel.backend)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    log = say if info.main else (lambda s: None)
    cfg.check(info.world)
    strategy = cfg.resolved_strategy(info.world)
    accumulation = cfg.accumulation(info.world)
    out = os.path.abspath(cfg.out)
    ckpt_root = os.path.join(out, "checkpoints")

    # -- where to start ------------------------------------------------------------------
    start_step, start_from = 0, None
    if info.main:
        os.makedirs(ckpt_root, exist_ok=True)
        found = C.listed(ckpt_root)
        if resume == "never" and found:
            raise ConfigError(f"{out} already holds checkpoints (newest {found[-1][1]}); pass --resume auto to continue "
                              "that run, or choose another out")
        if resume == "auto":
            good = C.newest_good(ckpt_root, warn=log)
            if good:
                start_step, start_from = good
        elif resume not in ("never", "auto"):
            problem = C.verify(resume)
            if problem:
                raise ConfigError(f"--resume {resume}: not a usable checkpoint: {problem}")
            start_step, start_from = C.read_meta(resume)["step"], resume
        if start_from:
            meta = C.read_meta(start_from)
            if (meta["strategy"], meta["world"]) != (strategy, info.world) and strategy in ("zero1", "zero2", "zero3", "fsdp2"):
                raise ConfigError(f"{start_from} was saved by {meta['strategy']} on {meta['world']} processes; a sharded "
                                  f"checkpoint resumes with the same strategy and world size (now {strategy} on {info.world})")
        _write_config(out, cfg)
    start_step, start_from = _broadcast((start_step, start_from), info)

    # -- model, data, strategy -----------------------------------------------------------
    shards = TokenShards(cfg.data.train, "train")
    windows = Windows(shards, cfg.data.seq_len, cfg.train.seed)
    heldout = _heldout(cfg, shards)
    model = build_model(cfg, shards, cfg.train.seed)
    if cfg.train.grad_checkpointing:
        model.gradient_checkpointing = True
    device = as_torch_device(dev)
    dtype = _dtype(cfg, dev)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    fpt = M.flops_per_token(model, cfg.data.seq_len)
    peak = M.peak_flops(dev.label(), str(dtype).replace("torch.", ""))
    runner = P.make_runner(model, cfg, strategy, info, device, dtype, accumulation)
    if start_from:
        runner.load(start_from)
    log(f"train: {n_params / 1e6:.1f}M parameters, {strategy} on {info.world} process(es) x {dev.label()} "
        f"({info.backend or 'no collectives'}), {str(dtype).replace('torch.', '')}, {shards.tokens:,} training tokens, "
        f"{windows.count:,} windows of {cfg.data.seq_len}; step {start_step} -> {cfg.train.steps}"
        + (f" (resumed from {start_from})" if start_from else ""))

    mlog = M.MetricsLog(out, tensorboard=cfg.log.tensorboard, resume_step=start_step) if info.main else None
    G, Mb, W = cfg.train.global_batch, cfg.train.micro_batch, info.world
    tokens_per_step = G * cfg.data.seq_len
    last_loss = heldout_loss = None
    window_t, window_steps = time.perf_counter(), 0

    def evaluate(step: int) -> float:
        loss = _evaluate(runner, heldout, cfg, info, device)
        if mlog:
            mlog.write({"step": step, "kind": "heldout", "loss": round(loss, 6), "ppl": round(math.exp(loss), 3)})
        log(f"step {step}: held-out loss {loss:.4f} (perplexity {math.exp(loss):,.1f})")
        runner.train(True)
        return loss

    try:
        if heldout is not None and cfg.eval.every and start_step == 0:
            heldout_loss = evaluate(0)  # the starting point of the held-out curve
        runner.train(True)
        window_t = time.perf_counter()  # training time starts here: the step-0 evaluation is not part of it
        for step in range(start_step, cfg.train.steps):
            lr = lr_at(step, cfg)
            losses = []
            for a in range(accumulation):
                first = step * G + (a * W + info.rank) * Mb
                x, y = windows.batch(first, Mb, device)
                losses.append(runner.micro(x, y, last=a == accumulation - 1, accumulation=accumulation))
            norm = runner.step(lr)
            loss = P.mean_over_ranks(torch.stack(losses).mean(), info)
            done = step + 1
            window_steps += 1
            last_loss = loss
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {done} (lr {lr:.3g}); lower optim.lr or check the data")
            if done % cfg.log.every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - window_t
                tps = tokens_per_step * window_steps / elapsed / W  # per device
                row = {"step": done, "loss": round(loss, 6), "grad_norm": round(norm, 6), "lr": lr, "tokens": done * tokens_per_step,
                       "tokens_per_s_per_device": round(tps, 1), "mfu": round(tps * fpt / peak, 4) if peak else None,
                       "memory_gib": round(M.memory_bytes(device) / 2**30, 3), "time": round(time.time(), 3)}
                if mlog:
                    mlog.write(row)
                log(f"step {done}/{cfg.train.steps} loss {loss:.4f} grad_norm {norm:.3f} lr {lr:.2e} "
                    f"{tps:,.0f} tok/s/device" + (f" mfu {row['mfu']:.1%}" if peak else ""))
                window_t, window_steps = time.perf_counter(), 0
            if heldout is not None and cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.train.steps):
                heldout_loss = evaluate(done)
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
                _save(runner, ckpt_root, done, cfg, info, strategy, tokens_per_step)
            if window_steps == 0:
                window_t = time.perf_counter()  # tokens/s counts training steps, not evaluation or saving
        _save_final(runner, out, shards, info, model, log)
    finally:
        if mlog:
            mlog.close()
    return TrainResult(out=out, steps=cfg.train.steps, resumed_from=start_step, final_loss=last_loss, heldout_loss=heldout_loss,
                       tokens=cfg.train.steps * tokens_per_step)


def _broadcast(obj, info):
    if info.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _heldout(cfg: TrainConfig, train_shards: TokenShards) -> Windows | None:
    from hanlin.train.shards import read_manifest

    folder = cfg.data.heldout or cfg.data.train
    if "heldout" not in read_manifest(folder).get("splits", {}):
        if cfg.data.heldout:
            raise ConfigError(f"data.heldout: {folder} has no 'heldout' split (prepare it with --heldout FRACTION)")
        return None
    shards = TokenShards(folder, "heldout")
    if (shards.vocab_size, shards.eos_id) != (train_shards.vocab_size, train_shards.eos_id):
        raise ConfigError(f"data.heldout: {folder} was tokenized differently from data.train")
    if (shards.tokens - 1) // cfg.data.seq_len < 1:
        return None
    return Windows(shards, cfg.data.seq_len, seed=0)


def _evaluate(runner, heldout: Windows, cfg: TrainConfig, info, device) -> float:
    """Mean loss over the first eval.batches x micro_batch x world held-out windows (in stream
    order, not shuffled: the same text at every evaluation)."""
    import torch

    from hanlin.train import parallel as P

    runner.train(False)
    Mb, W = cfg.train.micro_batch, info.world
    batches = max(1, min(cfg.eval.batches, heldout.count // (Mb * W)))
    losses = []
    for b in range(batches):
        first = (b * W + info.rank) * Mb
        n = max(0, min(Mb, heldout.count - first))
        if n == 0:
            break
        x, y = heldout.batch(first, n, device, shuffled=False)
        losses.append(runner.evaluate(x, y).float())
    return P.mean_over_ranks(torch.stack(losses).mean(), info)


def _save(runner, root: str, step: int, cfg: TrainConfig, info, strategy: str, tokens_per_step: int) -> None:
    import shutil

    from hanlin.train import parallel as P

    tmp, final = C.tmp_dir(root, step), C.step_dir(root, step)
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    P.barrier(info)
    runner.save(tmp)
    P.barrier(info)
    if info.main:
        C.seal(tmp, final, {"step": step, "strategy": strategy, "world": info.world, "tokens": step * tokens_per_step,
                            "config": cfg.to_dict()})
        C.prune(root, cfg.checkpoint.keep)
    P.barrier(info)


def _save_final(runner, out: str, shards: TokenShards, info, model, log) -> None:
    """OUT/final: an HF-layout folder (safetensors + config.json + the shards' tokenizer), which
    `hanlin chat --model OUT/final` and `hanlin export` read."""
    from hanlin.backends.files import folder_written_at
    from hanlin.backends.tokenizer import write_tokenizer_files
    from hanlin.backends.torch.model import Transformer
    from hanlin.backends.torch.weights import save_hf_folder

    state = runner.full_state()  # every rank takes part (a gather under ZeRO-3 / FSDP2); rank 0 gets it
    if not info.main:
        return
    whole = Transformer(model.config)  # the runner's model may hold shards; this one holds the whole
    whole.load_state_dict(state, strict=True)
    final = os.path.join(out, "final")
    with folder_written_at(final, prefix=".final-") as tmp:
        save_hf_folder(whole, tmp)
        if shards.tokenizer:
            write_tokenizer_files(os.path.dirname(os.path.join(shards.folder, shards.tokenizer)), tmp)
    log(f"train: model saved to {final}")


def _write_config(out: str, cfg: TrainConfig) -> None:
    import yaml

    from hanlin.backends.files import write_text

    write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
