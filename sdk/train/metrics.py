"""What a training run reports: tokens/s per device, MFU, loss, grad norm, lr, memory; written
as JSONL (one row per logged step) and, when asked, to TensorBoard.

MFU (model FLOPs utilisation, PaLM appendix B): achieved model FLOP/s over the device's peak.
A step's model FLOPs per token are 6 x N (N = parameters in matmuls: every Linear and the
lm_head; the embedding lookup is not a matmul) plus 12 x layers x dim x seq_len for attention
scores and values (forward 2, backward 4 multiply-adds per product). Activation recomputation
(gradient checkpointing) is not counted, as PaLM does, so MFU stays comparable across settings.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Dense bfloat16 peak FLOP/s by device name (substring, lower case), from the vendors' data
# sheets. Devices not listed (CPUs among them) report no MFU rather than a made-up one.
PEAK_BF16_FLOPS = (
    ("h200", 989e12),  # NVIDIA H200 SXM: 989 TFLOPS dense BF16 (same tensor cores as H100 SXM)
    ("h100 pcie", 756e12),  # H100 PCIe
    ("h100 nvl", 835e12),  # H100 NVL
    ("h100", 989e12),  # H100 SXM5
    ("a100", 312e12),  # A100 (SXM and PCIe)
    ("l40s", 362e12),
    ("910b", 313e12),  # Ascend 910B (910B3 figure; 910B1/B2 are rated higher, so MFU errs high, never low)
)


def peak_flops(device_name: str, dtype: str) -> float | None:
    if dtype != "bfloat16":
        return None
    name = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the native Transformer."""
    from torch import nn

    cfg = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def memory_bytes(device) -> int:
    """Peak memory of this process on its device: allocator peak on CUDA/NPU, resident set on CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "npu":
        return int(torch.npu.max_memory_allocated(device))  # torch_npu mirrors torch.cuda's API
    from hanlin.devices.tools import peak_rss_bytes

    return peak_rss_bytes()


class MetricsLog:
    """log.jsonl (appended, flushed per row) and TensorBoard scalars; rank 0 only."""

    def __init__(self, out: str, *, tensorboard: bool, resume_step: int = 0):
        self.path = os.path.join(out, "log.jsonl")
        truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the tensorboard package is missing
                raise RuntimeError(f"log.tensorboard needs the tensorboard package ({e}); pip install tensorboard "
                                   "or set log.tensorboard: false") from None
            self._tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"{row.get('kind', 'train')}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(path: str, step: int) -> None:
    """Drop rows past `step` (a run resumed from an earlier checkpoint rewrites them), atomically."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill -9
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    from hanlin.backends.files import write_text

    write_text(path, "".join(keep))


def read_log(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
