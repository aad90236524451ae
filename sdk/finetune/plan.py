"""The memory planner of `hanlin finetune`: predicted peak memory, part by part, before anything heavy starts.

    from hanlin.finetune.plan import SIZES, plan, shape_for, parse_memory
    p = plan(SIZES["7b"], method="qlora", seq_len=2048, micro_batch=1, grad_checkpoint=True,
             dtype="bfloat16", device_kind="cuda", device_memory=parse_memory("8GB"))
    print(p.table())

Everything here is arithmetic on a model's shape (no weights are read, torch is not needed),
so `--plan` works for a model that is not on disk (`--model-size 7b`) and a device that is
not here (`--device-memory 8GB`).

The peak is the sum of these parts (bytes), each computed by one function below:
    runtime      the framework's own memory before the model loads (measured RSS on CPU,
                 a CUDA/NPU context allowance on an accelerator)
    weights      the base model: float32 4 B/param, bfloat16 2 B/param; QLoRA's 7 projections
                 per layer in NF4 (0.5 B/param + double-quantized absmax)
    adapters     the LoRA A/B matrices, float32 whatever the base's dtype (the trainer upcasts
                 them, as peft's get_peft_model does: AdamW steps of 2e-4 vanish in bfloat16)
    gradients    one per trainable parameter, in the trainable parameters' dtype
    optimizer    AdamW: 2 float32 states per trainable parameter; 8-bit: 2 bytes; paged
                 8-bit on CUDA lives in host memory (counted as 0 on the device)
    activations  what autograd saves during the forward (measured, see _saved_per_token_layer),
                 over all layers, or with gradient checkpointing each layer's input plus
                 one layer's full activations while it is recomputed
    logits       one chunk of lm_head + cross-entropy (the trainer computes the loss in
                 chunks of LOSS_CHUNK rows under checkpoint, never B*T*V logits at once)
    transient    the largest temporaries of the backward: the gradient of the hidden
                 states and one layer's MLP gradients

Shapes: B micro-batch rows, T sequence length, C model dim, F MLP hidden dim, H heads,
K kv heads, D head dim, V vocab, L layers, r LoRA rank.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from hanlin.backends.base import ConfigError

GiB = 1 << 30
MiB = 1 << 20

METHODS = ("lora", "qlora", "full", "dpo")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
DTYPES = {"float32": 4, "bfloat16": 2}

DEVICE_KINDS = ("cpu", "cuda", "npu")
PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# The trainer computes lm_head + cross-entropy over LOSS_CHUNK selected positions at a time.
LOSS_CHUNK = 256  # = hanlin.finetune.trainer.CHUNK (a test checks they agree)
# Float32-sized (rows x V) buffers counted for one chunk (backends/torch/losses.py): the logits in
# the matmul's dtype and their float32 copy, then in the backward the recomputed float32
# (onehot - softmax) and its cast for the matmul. Four float32 buffers over-count that a little
# on a bfloat16 model; the measured peaks stay within 7% (README, Fine-tune).
LOGITS_BUFFERS = 4
# An accelerator's own memory before the model loads: the CUDA context, cuBLAS workspace and
# the caching allocator's first blocks (about 0.5 GiB on recent GPUs); torch_npu's context
# and workspaces similarly (allowance, not measured here).
CONTEXT_ALLOWANCE = {"cuda": GiB // 2, "npu": GiB}
# NF4 with double quantization (bitsandbytes' default): 4 bits per weight, one 8-bit absmax
# per block of 64, one float32 absmax per 256 of those blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def training_dtype(requested: str, method: str, device_kind: str, device_dtypes=()) -> str:
    """The compute dtype a run uses: `requested` unless it is "auto". Auto on an accelerator is
    bfloat16. On a CPU it is bfloat16 for the frozen-base methods (lora, qlora, dpo) where the
    CPU computes it natively (AVX512-BF16, AMX, ARM BF16: device.dtypes lists "bfloat16"): a
    LoRA step on the default model ran 1.6x faster in bfloat16 than in float32 here (AVX512-BF16,
    tools/bench_finetune.py), with the adapters, their optimizer state and the loss still in
    float32. Full fine-tuning stays float32 on a CPU: its weights are what AdamW updates, and
    bfloat16 weights round away most of each small update."""
    if requested != "auto":
        return requested
    if device_kind != "cpu":
        return "bfloat16"
    return "bfloat16" if method != "full" and "bfloat16" in tuple(device_dtypes) else "float32"


# --------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------


@dataclass
class Shape:
    vocab_size: int  # V
    dim: int  # C
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # K
    head_dim: int  # D
    hidden_dim: int  # F
    tie_embeddings: bool
    name: str = field(default="", compare=False)

    @classmethod
    def from_config(cls, cfg: Any, name: str = "") -> "Shape":
        """From a hanlin.backends.torch.model.ModelConfig (or anything with its fields)."""
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim or cfg.dim // cfg.n_heads,
            hidden_dim=cfg.hidden_dim,
            tie_embeddings=bool(cfg.tie_embeddings),
            name=name,
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each of a layer's 7 linear projections."""
        C, F, HD, KD = (
            self.dim,
            self.hidden_dim,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        )
        return {
            "q_proj": (C, HD), "k_proj": (C, KD), "v_proj": (C, KD), "o_proj": (HD, C),
            "gate_proj": (C, F), "up_proj": (C, F), "down_proj": (F, C),
        }  # fmt: skip

    @property
    def projection_params(self) -> int:
        """Parameters in the linear projections of all layers (what QLoRA stores in 4 bits)."""
        return self.n_layers * sum(i * o for i, o in self.projection_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, norms and an untied lm_head: what QLoRA keeps in the compute dtype."""
        V, C = self.vocab_size, self.dim
        return V * C + self.n_layers * 2 * C + C + (0 if self.tie_embeddings else V * C)

    @property
    def n_params(self) -> int:
        return self.projection_params + self.other_params


SIZES: dict[str, Shape] = {
    "135m": Shape(49152, 576, 30, 9, 3, 64, 1536, True, name="SmolLM2-135M"),
    "0.5b": Shape(151936, 896, 24, 14, 2, 64, 4864, True, name="Qwen2.5-0.5B"),
    "1.8b": Shape(92544, 2048, 24, 16, 8, 128, 8192, False, name="InternLM2-1.8B"),
    "7b": Shape(32000, 4096, 32, 32, 32, 128, 11008, False, name="Llama-2-7B"),
    "8b": Shape(128256, 4096, 32, 32, 8, 128, 14336, False, name="Llama-3-8B"),
    "13b": Shape(32000, 5120, 40, 40, 40, 128, 13824, False, name="Llama-2-13B"),
}

# catalogue entries (by their canonical name) whose shape is one of SIZES
_CATALOG_SIZES = {
    "smollm2-135m-instruct": "135m",
    "internlm2-chat-1.8b": "1.8b",
    "qwen2.5-0.5b-instruct": "0.5b",
}


def shape_for(model: str | None = None, model_size: str | None = None) -> Shape:
    """The shape to plan for: a size key ("7b"), a catalogue name or alias ("smollm2"),
    or a local .gguf file / Hugging Face folder (read without loading any weights)."""
    if model_size is not None:
        key = model_size.strip().lower()
        if key not in SIZES:
            raise ConfigError(
                f"unknown model size {model_size!r}: choose one of {', '.join(SIZES)}"
            )
        return SIZES[key]
    if not model:
        raise ConfigError(
            f"give a model (a .gguf file, an HF folder or a catalogue name) or a size: {', '.join(SIZES)}"
        )
    if model.strip().lower() in SIZES:
        return SIZES[model.strip().lower()]
    if os.path.isdir(model):
        return _shape_from_hf_folder(model)
    if os.path.isfile(model):
        return _shape_from_gguf(model)
    from hanlin.catalog import find_entry

    entry = find_entry(model)
    if entry is not None and entry.name in _CATALOG_SIZES:
        return SIZES[_CATALOG_SIZES[entry.name]]
    raise ConfigError(
        f"cannot plan for model {model!r}: it is not a file, a folder or a known catalogue name; "
        f"give its shape instead with one of the sizes {', '.join(SIZES)} (e.g. --model-size 7b)"
    )


def _shape_from_hf_folder(folder: str) -> Shape:
    from hanlin.backends.torch.weights import config_from_hf

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{folder} is a folder without config.json: not a Hugging Face model folder"
        )
    with open(path, encoding="utf-8") as f:
        cfg = config_from_hf(json.load(f))
    return Shape.from_config(cfg, name=os.path.basename(os.path.normpath(folder)))


def _shape_from_gguf(path: str) -> Shape:
    from hanlin.backends.gguf.gguf_file import read_gguf
    from hanlin.backends.torch.weights import config_from_gguf

    info = read_gguf(path)
    md = dict(info.metadata)
    if md.get("general.architecture") == "internlm2":
        # same math and the same metadata keys under another prefix
        md = {k.replace("internlm2.", "llama.", 1): v for k, v in md.items()}
        md["general.architecture"] = "llama"
    cfg = config_from_gguf(md)
    names = {t.name for t in info.tensors}
    cfg.tie_embeddings = "output.weight" not in names
    return Shape.from_config(cfg, name=os.path.basename(path))


# --------------------------------------------------------------------------------------
# Memory sizes as people write them
# --------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_memory(text: str | int) -> int:
    """Bytes from "8GB", "8 GiB", "24g", "512MB" or a plain byte count.

    GB and GiB are both read as 2**30 bytes (a "8 GB" GPU has 8 GiB as nvidia-smi counts it).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(
                f"device memory {text!r} must be a positive number of bytes"
            )
        return text
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    unit = (
        unit[:-2]
        if unit.endswith("ib")
        else unit[:-1]
        if len(unit) == 2 and unit.endswith("b")
        else unit
    )
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or value <= 0:
        raise ConfigError(
            f"cannot read memory size {text!r}: write it like 8GB, 8GiB, 24g, 512MB or a byte count"
        )
    return int(value * _UNITS[unit])


def human(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------
# The activation model (measured)
# --------------------------------------------------------------------------------------


def _saved_per_token_layer(
    shape: Shape,
    method: str,
    dtype: str,
    lora_r: int,
    lora_targets,
    seq_len: int,
    device_kind: str,
) -> float:
    """Bytes autograd saves per token per layer in hanlin's Transformer block.

    Measured with torch.autograd.graph.saved_tensors_hooks on the block forward (2-layer
    random models, float32 and bfloat16, LoRA via peft inject_adapter_in_model on q_proj and
    v_proj, QLoRA with bitsandbytes Linear4bit, full fine-tuning), counting unique storages by
    data_ptr and leaving out parameter storages (frozen weights are saved by reference).
    tests/test_finetune_plan.py repeats that measurement and checks this function against it.
    b is the compute dtype's size; norms and attention's logsumexp are float32 whatever b is.
      each RMSNorm (2 per layer): its float32 input and rsqrt           4C + 4
        full only: the normalized x (norm weight's gradient) and the
        norm output (the next projections' weight gradients)           + 2bC
      LoRA on a projection: its input cast to the adapters' float32,
        when no other term saves it, and lora_A's output (float32)     4*in + 4*r
      attention (SDPA, CPU flash / CUDA memory-efficient kernels): q, k, v after RoPE and the
        output b(2H + 2K)D, the logsumexp 4H, the bool mask turned into a float bias bT
      MLP: gate and up outputs 2bF (model.SiluMul recomputes silu(gate) in the backward);
      full: also silu*up bF (down_proj's input)
      CUDA with GQA (K < H) and a mask: no fused CUDA kernel takes both (flash takes no
        mask, memory-efficient no GQA), so SDPA runs its math path, which saves q, k and v
        repeated to H heads, the output, and the softmax probabilities: b*4HD + bHT, plus
        the float mask bT. That branch is an estimate (no GPU was at hand to measure it);
        the trainer avoids it by repeating k and v to H heads itself.
    """
    C, F, H, K, D = (
        shape.dim,
        shape.hidden_dim,
        shape.n_heads,
        shape.n_kv_heads,
        shape.head_dim,
    )
    b, T = DTYPES[dtype], seq_len
    full = method == "full"
    saved = 2 * (4 * C + 4)
    if full:
        saved += 2 * (2 * b * C)
    else:
        ins = shape.projection_shapes()
        targets = set(lora_targets)
        # the adapters are float32 (trainer.add_lora): peft casts each input to float32 and
        # lora_A saves the cast. With a float32 base the cast is the input itself, shared by the
        # projections that read it (and o_proj's input, attention's output, is saved by SDPA
        # already); with a bfloat16 base each adapted projection saves its own float32 copy.
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",), ("o_proj",)):
            hit = [t for t in group if t in targets and t in ins]
            if not hit:
                continue
            width = ins[hit[0]][0]
            if b != 4:
                saved += 4 * width * len(hit)
            elif group != ("o_proj",):
                saved += 4 * width
        saved += sum(4 * lora_r for t in targets if t in ins)  # lora_A's output
    if device_kind == "cuda" and K < H:
        saved += (
            b * 4 * H * D + b * H * T + b * T
        )  # math path (see above) + the float mask
    else:
        saved += b * (2 * H + 2 * K) * D + 4 * H + b * T
    saved += b * (3 * F if full else 2 * F)  # gate and up outputs (model.SiluMul recomputes silu); full: down's input too
    return saved


def activation_bytes(shape: Shape, *, method: str, seq_len: int, micro_batch: int, grad_checkpoint: bool,
                     dtype: str, lora_r: int = 8, lora_targets=("q_proj", "v_proj"), device_kind: str = "cpu") -> int:  # fmt: skip
    """Bytes autograd holds at the end of the forward (before the loss chunks), worst case.

    Without checkpointing: every layer's saved tensors. With it: each layer's input (what
    torch.utils.checkpoint keeps) plus one layer's full saved tensors while it is recomputed.
    Then the parts outside the layers: RoPE cos/sin (B,1,T,D) twice, the bool mask (B,1,T,T),
    the final norm's float32 input and rsqrt, and the selected hidden states (all B*T
    positions in the worst case) that the loss chunks read.
    """
    rows = micro_batch * (2 if method == "dpo" else 1)
    tokens = rows * seq_len
    b = DTYPES[dtype]
    C, L = shape.dim, shape.n_layers
    per_layer = tokens * _saved_per_token_layer(
        shape, method, dtype, lora_r, lora_targets, seq_len, device_kind
    )
    layers = (L * tokens * b * C + per_layer) if grad_checkpoint else L * per_layer
    outside = (
        2 * tokens * shape.head_dim * b
        + rows * seq_len * seq_len
        + tokens * (4 * C + 4)
        + tokens * b * C
    )
    if method == "full":
        outside += tokens * (
            b * C + 8
        )  # final norm's normalized x, and the token ids embedding keeps
    return int(layers + outside)


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass
class Suggestion:
    label: str  # what to change, in words
    changes: dict[str, Any]  # the plan()/FinetuneConfig settings that change
    peak: int
    fits: bool

    def line(self, device_memory: int | None) -> str:
        verdict = "fits" if self.fits else "does not fit"
        return f"{self.label}: peak {human(self.peak)} ({verdict})"


@dataclass
class Plan:
    parts: dict[
        str, int
    ]  # bytes: runtime, weights, adapters, gradients, optimizer, activations, logits, transient
    peak: int
    device_memory: int | None
    device_name: str
    fits: bool | None
    suggestions: list[str]
    settings: dict[str, Any]
    options: list[Suggestion] = field(
        default_factory=list
    )  # the suggestions, as settings to apply
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        s = self.settings
        gc = "on" if s["grad_checkpoint"] else "off"
        lines = [
            f"Memory plan: {s['model']} ({s['n_params'] / 1e9:.2f}B params), {s['method']}, "
            f"seq {s['seq_len']} x micro-batch {s['micro_batch']}, gradient checkpointing {gc}, "
            f"{s['optimizer']}, {s['dtype']}, on {s['device_kind']}"
            + (f" ({self.device_name})" if self.device_name else ""),
        ]
        width = max(len(k) for k in self.parts)
        for name, n in self.parts.items():
            lines.append(f"  {name:<{width}}  {human(n):>11}")
        lines.append(f"  {'-' * (width + 13)}")
        if self.device_memory is None:
            lines.append(
                f"  {'peak':<{width}}  {human(self.peak):>11}   (device memory unknown: give --device-memory)"
            )
        else:
            pct = 100 * self.peak / self.device_memory
            verdict = "fits" if self.fits else "does not fit"
            lines.append(
                f"  {'peak':<{width}}  {human(self.peak):>11}   of {human(self.device_memory)} device memory ({pct:.0f}%): {verdict}"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.suggestions:
            lines.append("Settings that would change the peak:")
            lines.extend(f"  - {x}" for x in self.suggestions)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights(shape: Shape, method: str, dtype: str) -> int:
    b = DTYPES[dtype]
    if method == "qlora":
        return int(
            shape.projection_params * NF4_BYTES_PER_PARAM + shape.other_params * b
        )
    return shape.n_params * b


def _adapter_params(shape: Shape, lora_r: int, lora_targets) -> int:
    proj = shape.projection_shapes()
    unknown = [t for t in lora_targets if t not in proj]
    if unknown:
        raise ConfigError(
            f"unknown LoRA target(s) {unknown}: choose from {', '.join(PROJECTIONS)}"
        )
    return shape.n_layers * sum(
        lora_r * (proj[t][0] + proj[t][1]) for t in lora_targets
    )


def _runtime(device_kind: str, runtime: int | None) -> int:
    if runtime is not None:
        return int(runtime)
    if device_kind != "cpu":
        return CONTEXT_ALLOWANCE[device_kind]
    # measured: this process's resident memory, with torch imported (the trainer imports it
    # before loading the model, so it belongs to the framework's share)
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def plan(
    shape: Shape,
    *,
    method: str,
    seq_len: int,
    micro_batch: int,
    grad_checkpoint: bool,
    optimizer: str = "adamw",
    lora_r: int = 8,
    lora_targets=("q_proj", "v_proj"),
    dtype: str = "float32",
    device_kind: str = "cpu",
    device_memory: int | None = None,
    device_name: str = "",
    runtime: int | None = None,
    grad_accum: int = 1,
    suggest: bool = True,
) -> Plan:
    """Predicted peak memory of one fine-tuning step, part by part, against device_memory.

    Where it does not fit, suggestions: each a change of settings with its own predicted
    peak (plan() called again with that change), in the order gradient checkpointing, 4-bit
    base, smaller micro-batch with accumulation, shorter sequences, 8-bit / paged optimizer,
    then those combined until one fits.
    """
    if method not in METHODS:
        raise ConfigError(
            f"plan: method={method!r} is not valid: choose one of {', '.join(METHODS)}"
        )
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"plan: optimizer={optimizer!r} is not valid: choose one of {', '.join(OPTIMIZERS)}"
        )
    if dtype not in DTYPES:
        raise ConfigError(
            f"plan: dtype={dtype!r} is not valid: choose one of {', '.join(DTYPES)}"
        )
    if device_kind not in DEVICE_KINDS:
        raise ConfigError(
            f"plan: device_kind={device_kind!r} is not valid: choose one of {', '.join(DEVICE_KINDS)}"
        )
    for name, v in (
        ("seq_len", seq_len),
        ("micro_batch", micro_batch),
        ("lora_r", lora_r),
        ("grad_accum", grad_accum),
    ):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"plan: {name}={v!r} is not valid: a positive integer")
    lora_targets = tuple(lora_targets)
    b = DTYPES[dtype]
    rows = micro_batch * (2 if method == "dpo" else 1)  # dpo: chosen and rejected rows
    tokens = rows * seq_len
    notes = []

    # trainable parameters: the whole model in the compute dtype (full), or float32 adapters
    adapter_params = (
        0 if method == "full" else _adapter_params(shape, lora_r, lora_targets)
    )
    trainable = shape.n_params if method == "full" else adapter_params
    if optimizer == "adamw":
        opt_bytes = 8 * trainable  # exp_avg and exp_avg_sq, float32
    elif optimizer == "paged_adamw8bit" and device_kind == "cuda":
        opt_bytes = 0
        notes.append(
            f"paged 8-bit optimizer state ({human(2 * trainable)}) lives in host memory, paged in as needed"
        )
    else:
        opt_bytes = 2 * trainable  # two 8-bit states (block absmax adds < 1%)
    C, F = shape.dim, shape.hidden_dim
    logits_rows = min(LOSS_CHUNK, tokens)
    parts = {
        "runtime": _runtime(device_kind, runtime),
        "weights": _weights(shape, method, dtype),
        "adapters": adapter_params * 4,
        "gradients": trainable * (b if method == "full" else 4),
        "optimizer": opt_bytes,
        "activations": activation_bytes(
            shape,
            method=method,
            seq_len=seq_len,
            micro_batch=micro_batch,
            grad_checkpoint=grad_checkpoint,
            dtype=dtype,
            lora_r=lora_r,
            lora_targets=lora_targets,
            device_kind=device_kind,
        ),  # fmt: skip
        "logits": LOGITS_BUFFERS * logits_rows * shape.vocab_size * 4,
        # the gradient flowing back through the hidden states (B,T,C) and one layer's MLP
        # gradients (gate, up, silu*up: 3 x (B,T,F)) plus the residual's second copy (B,T,C)
        "transient": tokens * b * (2 * C + 3 * F),
    }
    peak = sum(parts.values())
    if method == "qlora" and device_kind == "cpu":
        # the float weights are read first, then the projections are quantized to NF4; on the
        # default model the float weights' memory was still resident when the last projection
        # was quantized (peak RSS 1139 MiB, seq 128), so both count: at small batches this
        # moment is the run's peak
        loading = parts["runtime"] + _weights(shape, "lora", dtype) + parts["weights"]
        if loading > peak:
            notes.append(f"the peak is while loading: the {dtype} weights are read, then quantized to NF4")
            peak = loading
    fits = None if device_memory is None else peak <= device_memory
    settings = {
        "model": shape.name or "model", "n_params": shape.n_params, "method": method, "seq_len": seq_len,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "grad_checkpoint": grad_checkpoint,
        "optimizer": optimizer, "lora_r": lora_r, "lora_targets": list(lora_targets), "dtype": dtype,
        "device_kind": device_kind,
    }  # fmt: skip
    if method == "dpo":
        notes.append(
            "dpo: chosen and rejected rows double the batch; the reference model is the base with adapters off"
        )
    result = Plan(
        parts, peak, device_memory, device_name, fits, [], settings, notes=notes
    )
    if suggest and fits is False:
        kwargs = dict(
            method=method, seq_len=seq_len, micro_batch=micro_batch, grad_checkpoint=grad_checkpoint,
            optimizer=optimizer, lora_r=lora_r, lora_targets=lora_targets, dtype=dtype, device_kind=device_kind,
            device_memory=device_memory, device_name=device_name, runtime=parts["runtime"], grad_accum=grad_accum,
        )  # fmt: skip
        result.options = _suggest(shape, kwargs)
        result.suggestions = [o.line(device_memory) for o in result.options]
        if not any(o.fits for o in result.options):
            result.suggestions.append(
                "none of these fits this device: use a smaller model or a device with more memory"
            )
    return result


def _suggest(shape: Shape, kwargs: dict[str, Any]) -> list[Suggestion]:
    """Each single change in order, then the changes combined in that order until one fits."""

    def peak_of(changes: dict[str, Any]) -> int:
        return plan(shape, **{**kwargs, **changes, "suggest": False}).peak

    mem = kwargs["device_memory"]
    singles: list[tuple[str, dict[str, Any]]] = []
    if not kwargs["grad_checkpoint"]:
        singles.append(
            ("gradient checkpointing (--grad-checkpoint)", {"grad_checkpoint": True})
        )
    if kwargs["method"] in ("lora", "full"):
        singles.append(("4-bit base (--method qlora)", {"method": "qlora"}))
    if kwargs["micro_batch"] > 1:
        singles.append(_smaller_batch(kwargs, peak_of, mem, {}))
    if kwargs["seq_len"] > 128:
        singles.append(_shorter_seq(kwargs, peak_of, mem, {}))
    if kwargs["optimizer"] == "adamw":
        paged = "paged_adamw8bit" if kwargs["device_kind"] == "cuda" else "adamw8bit"
        singles.append(
            (
                f"8-bit optimizer state{', paged to host' if paged.startswith('paged') else ''} (--optimizer {paged})",
                {"optimizer": paged},
            )
        )

    out = []
    for label, changes in singles:
        p = peak_of(changes)
        out.append(Suggestion(label, changes, p, p <= mem))
    if any(o.fits for o in out) or len(singles) < 2:
        return out
    combined: dict[str, Any] = {}
    labels: list[str] = []
    for label, changes in singles:
        if (
            "micro_batch" in changes
        ):  # re-choose the batch and length given the changes so far
            label, changes = _smaller_batch(kwargs, peak_of, mem, combined)
        elif "seq_len" in changes:
            label, changes = _shorter_seq(kwargs, peak_of, mem, combined)
        combined = {**combined, **changes}
        labels.append(label)
        if len(labels) < 2:
            continue
        p = peak_of(combined)
        out.append(Suggestion(" + ".join(labels), dict(combined), p, p <= mem))
        if p <= mem:
            break
    return out


def _smaller_batch(
    kwargs, peak_of, mem, base: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The largest smaller micro-batch that fits (else 1), accumulation keeping tokens per step."""
    mb = kwargs["micro_batch"]
    tried = [m for m in range(mb - 1, 0, -1) if mb % m == 0] or [1]
    pick = tried[-1]
    for m in tried:
        if (
            peak_of(
                {**base, "micro_batch": m, "grad_accum": kwargs["grad_accum"] * mb // m}
            )
            <= mem
        ):
            pick = m
            break
    accum = kwargs["grad_accum"] * mb // pick
    return (f"micro-batch {pick} with {accum} accumulation steps (--micro-batch {pick} --grad-accum {accum})",
            {"micro_batch": pick, "grad_accum": accum})  # fmt: skip


def _shorter_seq(
    kwargs, peak_of, mem, base: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The longest halved sequence length (down to 128) that fits, else 128."""
    t = kwargs["seq_len"] // 2
    lengths = []
    while t >= 128:
        lengths.append(t)
        t //= 2
    lengths = lengths or [kwargs["seq_len"]]
    pick = lengths[-1]
    for t in lengths:
        if peak_of({**base, "seq_len": t}) <= mem:
            pick = t
            break
    return f"shorter sequences (--seq-len {pick})", {"seq_len": pick}


def main(
    argv: list[str] | None = None,
) -> None:  # pragma: no cover - a quick look from the shell
    """python -m hanlin.finetune.plan 7b qlora 2048 8GB"""
    a = (argv if argv is not None else sys.argv[1:]) + [None] * 4
    p = plan(
        shape_for(a[0] or "135m"), method=a[1] or "lora", seq_len=int(a[2] or 512), micro_batch=1,
        grad_checkpoint=False, dtype="bfloat16", device_kind="cuda", device_memory=parse_memory(a[3] or "8GB"),
    )  # fmt: skip
    print(p.table())


if __name__ == "__main__":  # pragma: no cover
    main()
