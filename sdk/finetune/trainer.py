"""The fine-tuning loop: one plain function over small parts (torchtune's recipe style).

    result = train(FinetuneConfig(model="smollm2", data="facts.jsonl", out="runs/facts"))

What happens, in order:
1. the plan (plan.py) is printed: predicted peak memory per part against the device's;
2. the base model is loaded as the native Transformer (backends/torch), the rows are rendered
   with its own chat template (data.py), packed and split;
3. the method shapes the model: "lora" injects peft LoRA adapters (base frozen), "qlora" first
   swaps every projection for a bitsandbytes NF4 Linear4bit, "full" trains every weight, "dpo"
   trains LoRA adapters against the same base with the adapters switched off as reference;
4. the loop: micro-batches, gradient accumulation, clipping, AdamW (or bitsandbytes' 8-bit /
   paged AdamW), warmup then cosine/linear decay, a progress line, log.jsonl, a checkpoint every
   `save_every` steps written atomically with everything `resume` needs;
5. the adapter (peft's own file layout) or, for "full", the HF folder is saved; loss.png drawn.

The loss never builds the (B, T, V) logits: the model returns the final hidden states, only the
rows that carry a label go through lm_head, in chunks of CHUNK rows (backends/torch/losses.py:
nothing of size V is saved for the backward, which recomputes one chunk's logits at a time), so
the (B, T, V) tensor, the largest thing in a small model's step at a 49k vocabulary, never exists.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hanlin.backends.base import ConfigError, ModelError
from hanlin.backends.torch.engine import as_torch_device
from hanlin.backends.torch.lora import ADAPTER_DIR, MODEL_DIR, RUN_FILE  # what chat and merge read back
from hanlin.finetune.config import FinetuneConfig

CHUNK = 256  # lm_head rows per loss chunk: a few CHUNK x V float buffers live at once (50 MiB each at V=49152)

LOG_FILE = "log.jsonl"
CKPT_PREFIX = "checkpoint-"
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "dpo": 5e-5}


@dataclass
class RunResult:
    run_dir: str
    steps: int
    train_loss: float | None
    val_loss: float | None
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step (this process)
    step_tokens: list[int] = field(default_factory=list)  # real (non-padding) tokens per step
    peak_rss: int = 0  # bytes: this process's peak resident set
    peak_device: int | None = None  # bytes: torch's peak allocation on an accelerator
    bad_rows: int = 0
    plan_peak: int | None = None
    stopped: bool = False  # should_stop asked it to stop: a checkpoint was saved, --resume continues
    allocator: str = ""  # the process's malloc: "mimalloc" (preloaded by `hanlin finetune`), "glibc", "system"


# --------------------------------------------------------------------------------------
# the loss: lm_head on labelled rows only, in chunks
# --------------------------------------------------------------------------------------


def labelled_rows(hidden, labels):
    """hidden (B, T, C), labels (B, T) -> the hidden rows that predict a label (N, C), the
    targets (N,) and each row's batch index (N,): position t predicts token t+1."""
    h, y = hidden[:, :-1], labels[:, 1:]
    keep = y != -100  # (B, T-1)
    rows = keep.nonzero(as_tuple=True)[0]
    return h[keep], y[keep], rows


def _label_logps(h, y, weight):
    """log p(label) of each labelled row (N,), float32, CHUNK rows of logits at a time."""
    import torch

    from hanlin.backends.torch.losses import linear_logprob

    parts = [linear_logprob(h[i : i + CHUNK], weight, y[i : i + CHUNK]) for i in range(0, y.numel(), CHUNK)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def sft_loss(model, batch):
    """Mean cross-entropy over the labelled tokens, and how many there were."""
    hidden = model(batch["ids"], positions=batch["positions"], mask=batch["mask"], hidden_only=True)
    h, y, _ = labelled_rows(hidden, batch["labels"])
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    return -_label_logps(h, y, model.lm_head.weight).sum() / n, n


def sequence_logps(model, batch):
    """Sum of log p(label) per row (B,): DPO's log-likelihood of each completion."""
    import torch

    hidden = model(batch["ids"], positions=batch["positions"], mask=batch["mask"], hidden_only=True)
    h, y, rows = labelled_rows(hidden, batch["labels"])
    logp = _label_logps(h, y, model.lm_head.weight)
    return torch.zeros(batch["ids"].shape[0], dtype=torch.float32, device=h.device).index_add(0, rows, logp)


def dpo_loss(model, batch, beta: float):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * (policy margin - reference margin)), the
    reference being the same base with the adapters switched off. Rows: B chosen, then B rejected."""
    import torch
    import torch.nn.functional as F

    logp = sequence_logps(model, batch)
    with torch.no_grad(), adapters_off(model):
        ref = sequence_logps(model, batch)
    B = logp.shape[0] // 2
    margin = (logp[:B] - logp[B:]) - (ref[:B] - ref[B:])
    loss = -F.logsigmoid(beta * margin).mean()
    return loss, int((batch["labels"][:, 1:] != -100).sum())


class adapters_off:
    """Context manager: every LoRA layer of the model passes its base output only."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


# --------------------------------------------------------------------------------------
# the methods: shaping the model
# --------------------------------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_nf4(model, device) -> int:
    """Swap every projection of every layer for a bitsandbytes NF4 Linear4bit (QLoRA's base);
    embeddings, norms and the lm_head stay in the compute dtype. Returns how many were swapped."""
    import bitsandbytes as bnb
    import torch

    dev, swapped = as_torch_device(device), 0
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in PROJECTIONS:
                lin = getattr(parent, name, None)
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=lin.weight.dtype,
                                      quant_type="nf4", compress_statistics=True, device="meta")  # fmt: skip
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q.to(dev))
                swapped += 1
    return swapped


def add_lora(model, cfg: FinetuneConfig) -> None:
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=list(cfg.lora_targets), bias="none"), model)  # fmt: skip
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"finetune: lora_targets {list(cfg.lora_targets)} matched no layer; the model's projections are {', '.join(PROJECTIONS)}")
    # float32 adapters on any base (peft's get_peft_model does the same): a bfloat16 weight
    # keeps 8 bits of mantissa, so AdamW's steps of ~lr x 1 would mostly round away. peft casts
    # each input to the adapter's dtype and the sum back to the base's.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def adapter_state(model) -> dict[str, Any]:
    """The LoRA weights, keyed by module path in `model` (_save_outputs adds peft's prefix)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def trainable_state(model, method: str) -> dict[str, Any]:
    if method == "full":
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}


# --------------------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------------------


def make_optimizer(params, cfg: FinetuneConfig, lr: float, device_kind: str):
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------
# run directory files: atomic writes
# --------------------------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int = 2) -> str:
    """checkpoint-STEP/state.pt written in a temp folder and renamed: a kill -9 at any moment
    leaves either the previous checkpoints or the new one, never half of one."""
    import torch

    final = os.path.join(run_dir, f"{CKPT_PREFIX}{step:07d}")
    tmp = tempfile.mkdtemp(prefix=".ckpt-", dir=run_dir)
    try:
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "state.pt"), "rb+") as f:
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if n.startswith(CKPT_PREFIX) and os.path.isfile(os.path.join(run_dir, n, "state.pt")))
    return [os.path.join(run_dir, n) for n in names]


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# glibc's mmap threshold while training (return_freed_memory): blocks at least this large are
# mapped on malloc and unmapped on free
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Make glibc give freed tensor memory back to the system (Linux).

    glibc serves blocks above its mmap threshold with mmap and unmaps them on free, but it
    raises that threshold (up to 32 MiB) each time such a block is freed, after which a step's
    activations come from the heap and stay resident once freed, fragmented. Fixing the
    threshold keeps the peak near what the planner counts; the price is fresh pages (page
    faults) for every mapped block each step, so a lower threshold costs speed. Measured on the
    default model, LoRA r8 q,v, 4 x 256 tokens, bfloat16, 5 steps, same machine, back to back
    (tokens/s, peak RSS): glibc's default 370, 2.22 GB; fixed at 4 MiB 365, 2.05 GB; at 1 MiB
    261, 1.61 GB; at 128 KiB 188, 1.54 GB. 1 MiB (MMAP_THRESHOLD) keeps most of the memory
    saving at 70% of the speed. On by default, so the plan holds; `--keep-freed-memory`
    (release_memory=False) leaves glibc's default. MALLOC_MMAP_THRESHOLD_=1048576 does the
    same for any process."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc (musl, ...): nothing to set
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    from hanlin.devices.tools import peak_rss_bytes

    return peak_rss_bytes()


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr, rewritten in place: step, loss, lr, tokens/s, memory."""

    def __init__(self, total: int, out=None):
        self.total, self.out = total, out or sys.stderr
        self.tty = getattr(self.out, "isatty", lambda: False)()

    def update(self, step: int, row: dict[str, Any]) -> None:
        width = 24
        done = int(width * step / max(1, self.total))
        line = (f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"{row['tokens_per_s']:.0f} tok/s mem {row['memory_gb']:.2f} GB")  # fmt: skip
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


def train(cfg: FinetuneConfig, *, resume: bool = False, log: Callable[[str], None] | None = None, progress: bool = True,
          stop_after: int | None = None, should_stop: Callable[[], bool] | None = None) -> RunResult:  # fmt: skip
    """Run (or, with resume, continue) one fine-tuning run; see the module docstring.
    stop_after: return after this many optimizer steps of this process (tests; the run stays resumable).
    should_stop: asked before each optimizer step; True saves a checkpoint and returns with
    result.stopped set (`hanlin finetune` on SIGTERM: the TUI's cancel), resumable like stop_after."""
    import torch

    from hanlin import catalog
    from hanlin.backends.torch.engine import _pick_dtype, load_parts
    from hanlin.devices import get_device
    from hanlin.finetune import data as D
    from hanlin.finetune import plan as P
    from hanlin.finetune.allocator import active as active_allocator

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg.validate()
    run_dir = os.path.abspath(cfg.out)
    previous = checkpoints(run_dir) if resume else []
    if resume and not previous:
        raise ConfigError(f"finetune: --resume given but {run_dir} has no checkpoint to resume from")
    if not resume and os.path.exists(os.path.join(run_dir, RUN_FILE)):
        raise ConfigError(f"finetune: {run_dir} already holds a run; pass --resume to continue it or choose another --out")
    os.makedirs(run_dir, exist_ok=True)

    src = catalog.resolve(cfg.model)
    device = get_device(cfg.device)
    dtype = _pick_dtype(P.training_dtype(cfg.dtype, cfg.method, device.kind, device.dtypes), device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    allocator = active_allocator()
    if device.kind == "cpu" and cfg.release_memory and allocator == "glibc":
        return_freed_memory()
    fallback = transformers_fallback(str(src.path))
    if fallback and cfg.method == "qlora":
        raise ConfigError(f"finetune: qlora swaps the native model's projections for NF4 ones; {src.path} is trained through "
                          f"transformers ({fallback}): use --method lora (or full, dpo)")  # fmt: skip
    if fallback:
        from hanlin.backends.torch.hf import load_trainable

        log(f"{fallback}: training it through transformers (rows unpacked, one example per sequence)")
        model, tok, meta = load_trainable(str(src.path), device, dtype)
    else:
        model, tok, meta = load_parts(str(src.path), device if cfg.method != "qlora" else get_device("cpu"), dtype)
    packing = cfg.packing and not fallback
    if cfg.method != "full":  # peft imports transformers: 130 MiB resident here, part of the runtime below
        import peft  # noqa: F401
    if cfg.grad_checkpoint:  # torch.utils.checkpoint's first call imports torch._dynamo and sympy
        # (155 MiB resident here): import them now, so the runtime measured below counts them
        from torch.utils.checkpoint import checkpoint

        checkpoint(torch.neg, torch.ones(1, requires_grad=True), use_reentrant=False)
    # the framework's share of host memory, measured: everything resident after loading except
    # the weights (torch, the tokenizer, the file's pages, the allocator's leftovers from loading)
    runtime = current_rss() - sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values()) if device.kind == "cpu" else None
    shape = P.Shape.from_config(model.config, meta.get("name") or os.path.basename(str(src.path)))
    the_plan = P.plan(shape, method=cfg.method, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, grad_checkpoint=cfg.grad_checkpoint,
                      optimizer=cfg.optimizer, lora_r=cfg.lora_r, lora_targets=cfg.lora_targets, dtype=str(dtype).replace("torch.", ""),
                      device_kind=device.kind, device_memory=device.memory_total, device_name=device.label(), runtime=runtime)  # fmt: skip
    log(the_plan.table())

    if not meta.get("chat_template"):
        raise ModelError(f"{src.path} has no chat template: fine-tuning renders rows with the model's own template")
    renderer = D.Renderer(meta["chat_template"], lambda s: tok.encode(s, add_bos=False, special=True), bos_token=meta.get("bos_token") or "",
                          eos_token=meta.get("eos_token") or "", add_bos=tok.add_bos, bos_id=model.config.bos_token_id)  # fmt: skip
    pad_id = min(tok.eos_ids) if tok.eos_ids else 0
    if cfg.method == "dpo":
        items, bad = D.load_dpo(cfg.data, renderer, seq_len=cfg.seq_len, on_bad=cfg.on_bad_row)
    else:
        items, bad = D.load_sft(cfg.data, renderer, seq_len=cfg.seq_len, on_bad=cfg.on_bad_row)
    for b in bad[:20]:
        log(f"skipped {cfg.data}:{b.line}: {b.reason}")
    if len(bad) > 20:
        log(f"... and {len(bad) - 20} more bad rows")
    train_items, val_items = D.split(items, cfg.val_fraction, cfg.seed)
    if cfg.method == "dpo":
        batches = [train_items[i : i + cfg.micro_batch] for i in range(0, len(train_items), cfg.micro_batch)]
        val_batches = [val_items[i : i + cfg.micro_batch] for i in range(0, len(val_items), cfg.micro_batch)]

        def collate(group):
            return D.collate_pairs(group, pad_id)
    else:
        seqs = D.pack(train_items, cfg.seq_len, pad_id) if packing else D.unpacked(train_items, cfg.seq_len, pad_id)
        vseqs = D.pack(val_items, cfg.seq_len, pad_id) if packing else D.unpacked(val_items, cfg.seq_len, pad_id)
        batches = [seqs[i : i + cfg.micro_batch] for i in range(0, len(seqs), cfg.micro_batch)]
        val_batches = [vseqs[i : i + cfg.micro_batch] for i in range(0, len(vseqs), cfg.micro_batch)]
        collate = D.collate
    per_epoch = max(1, len(batches) // cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total))
    log(f"data: {len(items)} rows ({len(bad)} skipped), {len(train_items)} train / {len(val_items)} validation, "
        f"{len(batches)} micro-batches of {cfg.micro_batch} x {cfg.seq_len}; {total} optimizer steps")  # fmt: skip

    if cfg.method == "qlora":  # loaded on the CPU; each projection goes to the device as NF4
        log(f"qlora: {to_nf4(model, device)} projections in NF4")
        model.to(as_torch_device(device))
    if cfg.method in ("lora", "qlora", "dpo"):
        add_lora(model, cfg)
    model.gradient_checkpointing = cfg.grad_checkpoint
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or DEFAULT_LR[cfg.method]
    opt = make_optimizer(params, cfg, lr, device.kind)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    n_train = sum(p.numel() for p in params)
    log(f"{cfg.method}: {n_train:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")

    step, cursor, history = 0, 0, []  # cursor: micro-batches consumed since the run began
    if resume:
        state = torch.load(os.path.join(previous[-1], "state.pt"), weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, cursor, history = state["step"], state["cursor"], state["history"]
        _truncate_log(os.path.join(run_dir, LOG_FILE), step)
        log(f"resumed from {os.path.basename(previous[-1])}: step {step}/{total}")
    log(f"memory allocator: {allocator}" + (" (freed memory returned: mmap threshold 1 MiB)" if allocator == "glibc" and cfg.release_memory else ""))
    write_json(os.path.join(run_dir, RUN_FILE), {"base_model": str(src.path), "method": cfg.method, "config": cfg.to_dict(),
                                                  "allocator": allocator, "plan": the_plan.to_dict(), "status": "running"})  # fmt: skip

    def order(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        return torch.randperm(len(batches), generator=g).tolist()

    def evaluate() -> float | None:
        if not val_batches:
            return None
        model.eval()
        total_loss, count = 0.0, 0
        with torch.no_grad():
            for group in val_batches:
                b = {k: v.to(model.lm_head.weight.device) for k, v in collate(group).items()}
                loss, n = dpo_loss(model, b, cfg.dpo_beta) if cfg.method == "dpo" else sft_loss(model, b)
                w = 1 if cfg.method == "dpo" else n
                total_loss, count = total_loss + float(loss.detach()) * w, count + w
        model.train()
        return total_loss / max(1, count)

    result = RunResult(run_dir, step, None, None, bad_rows=len(bad), plan_peak=the_plan.peak, allocator=allocator)
    bar = Progress(total) if progress else None
    torch_dev = model.lm_head.weight.device
    with open(os.path.join(run_dir, LOG_FILE), "a", encoding="utf-8") as logf:
        while step < total and (stop_after is None or len(result.step_times) < stop_after):
            if should_stop is not None and should_stop():
                result.stopped = True
                log(f"stopping: saving a checkpoint at step {step}")
                break
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            step_loss, step_tokens, step_labels = 0.0, 0, 0
            for _ in range(cfg.grad_accum):
                epoch, k = divmod(cursor, len(batches))
                group = batches[order(epoch)[k]]
                cursor += 1
                b = {key: v.to(torch_dev) for key, v in collate(group).items()}
                loss, n = dpo_loss(model, b, cfg.dpo_beta) if cfg.method == "dpo" else sft_loss(model, b)
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
                step_tokens += real_tokens(group)
                step_labels += n
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else None
            current_lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            result.step_times.append(dt)
            result.step_tokens.append(step_tokens)
            mem = torch.cuda.max_memory_allocated() if torch_dev.type == "cuda" else peak_rss()
            row = {"step": step, "total_steps": total, "loss": round(step_loss, 6), "lr": current_lr, "grad_norm": grad_norm, "tokens": step_tokens,
                   "labels": step_labels, "tokens_per_s": step_tokens / dt, "seconds": round(dt, 4), "memory_gb": mem / 2**30}  # fmt: skip
            if val_batches and (step == total or (cfg.save_every and step % cfg.save_every == 0)):
                row["val_loss"] = evaluate()
            history.append(row)
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            if bar:
                bar.update(step, row)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(run_dir, step, {"trainable": trainable_state(model, cfg.method), "optimizer": opt.state_dict(),
                                                "scheduler": sched.state_dict(), "rng": rng_state(), "step": step, "cursor": cursor,
                                                "history": history})  # fmt: skip
    if bar:
        bar.close()
    result.steps = step
    result.peak_rss = peak_rss()
    result.peak_device = torch.cuda.max_memory_allocated() if torch_dev.type == "cuda" else None
    result.train_loss = history[-1]["loss"] if history else None
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    result.val_loss = vals[-1] if vals else None
    if step < total:  # stopped early on purpose (stop_after, should_stop): leave a checkpoint to resume from
        save_checkpoint(run_dir, step, {"trainable": trainable_state(model, cfg.method), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "rng": rng_state(), "step": step, "cursor": cursor,
                                        "history": history})  # fmt: skip
        if result.stopped:
            write_json(os.path.join(run_dir, RUN_FILE), {"base_model": str(src.path), "method": cfg.method, "config": cfg.to_dict(),
                                                          "allocator": allocator, "plan": the_plan.to_dict(), "status": "stopped",
                                                          "steps": step, "total_steps": total})  # fmt: skip
        return result
    _save_outputs(run_dir, model, cfg, src, tok)
    draw_loss(history, os.path.join(run_dir, "loss.png"))
    write_json(os.path.join(run_dir, RUN_FILE), {"base_model": str(src.path), "method": cfg.method, "config": cfg.to_dict(),
                                                  "allocator": allocator, "plan": the_plan.to_dict(), "status": "done", "steps": step,
                                                  "train_loss": result.train_loss, "val_loss": result.val_loss,
                                                  "peak_rss": result.peak_rss, "peak_device": result.peak_device})  # fmt: skip
    log(f"done: {step} steps, train loss {result.train_loss}, validation loss {result.val_loss}; saved in {run_dir}")
    return result


def real_tokens(group) -> int:
    """Tokens a micro-batch trains on, padding excluded (packed sequences or DPO pairs)."""
    if group and hasattr(group[0], "docs"):
        return sum(sum(1 for d in p.docs if d >= 0) for p in group)
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in group)


def _truncate_log(path: str, step: int) -> None:
    """Drop log rows after the checkpoint's step (written by the killed process after it)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            break  # a line cut short by the kill: nothing after it is kept
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def transformers_fallback(path: str) -> str | None:
    """Why an HF folder is trained through transformers (an architecture the native model does
    not build), or None for the native model (GGUF files, run directories, llama/qwen2/internlm2)."""
    from hanlin.backends.torch.archs import why_not_native
    from hanlin.backends.torch.lora import is_run_dir

    if not os.path.isdir(path) or is_run_dir(path):
        return None
    return why_not_native(path)


def _save_outputs(run_dir: str, model, cfg: FinetuneConfig, src, tok) -> None:
    from safetensors.torch import save_file

    from hanlin.backends.torch.weights import save_hf_folder

    hf = getattr(model, "hf", None)  # the transformers fallback (backends/torch/hf.py HFTrainable)
    if cfg.method == "full":
        if hf is None:
            save_hf_folder(model, os.path.join(run_dir, MODEL_DIR))
        else:
            tmp = tempfile.mkdtemp(prefix=".model-", dir=run_dir)
            hf.save_pretrained(tmp)
            shutil.rmtree(os.path.join(run_dir, MODEL_DIR), ignore_errors=True)
            os.replace(tmp, os.path.join(run_dir, MODEL_DIR))
        return
    # adapter keys in peft's layout over the transformers model's module names: the fallback's
    # are those already (below its "hf." wrapper); the native Transformer's lack the "model." level
    from hanlin.backends.torch.lora import PEFT_PREFIX
    from hanlin.backends.torch.weights import hf_name

    state = {PEFT_PREFIX + (k.removeprefix("hf.") if hf is not None else hf_name(k)): v for k, v in adapter_state(model).items()}
    out = os.path.join(run_dir, ADAPTER_DIR)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=run_dir)
    try:
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump({"peft_type": "LORA", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                       "target_modules": list(cfg.lora_targets), "bias": "none", "task_type": "CAUSAL_LM",
                       "base_model_name_or_path": str(src.path)}, f, indent=2)  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def draw_loss(history: list[dict[str, Any]], path: str) -> bool:
    """loss.png: training loss per step (and validation loss where measured). False when
    matplotlib is not installed (the numbers are in log.jsonl either way)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    vals = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if vals:
        ax.plot(*zip(*vals), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True
