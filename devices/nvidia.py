"""NVIDIA GPUs: through torch when it is installed and a driver is loaded, else through nvidia-smi.

torch is imported only when there are signs of a driver (/proc/driver/nvidia/version or
/dev/nvidiactl): importing it costs about 1.5 s, which a CPU-only laptop or a phone should not pay
just to learn that it has no GPU. Without torch, nvidia-smi's CSV output is parsed by a pure
function tested on recorded real outputs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from hanlin.devices.device import Device, keep_visible
from hanlin.devices.tools import first_line, installed, read_text, run_tool

MiB = 1 << 20
NVIDIA_QUERY = ("index", "name", "memory.total", "memory.free", "compute_cap", "driver_version")
NVIDIA_SMI = ["nvidia-smi", f"--query-gpu={','.join(NVIDIA_QUERY)}", "--format=csv,noheader,nounits"]
_HEADER_CELL = re.compile(r"^[a-z][a-z0-9_.]*(?: \[[^\]]*\])?$")  # "memory.total [MiB]", "compute_cap"


def gpu_dtypes(compute_capability: str | None) -> tuple[str, ...]:
    """float16 runs on every GPU we would use; bfloat16 needs Ampere (compute capability 8.0) or later."""
    cc = _version_tuple(compute_capability)
    return ("float32", "bfloat16", "float16") if cc and cc >= (8, 0) else ("float32", "float16")


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _mib(value: str) -> int | None:
    """ "81559 MiB" / "81559" -> bytes; "[N/A]" (unified-memory parts such as GB10) -> None."""
    m = re.fullmatch(r"\s*(\d+)(?:\s*MiB)?\s*", value or "")
    return int(m.group(1)) * MiB if m else None


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = NVIDIA_QUERY) -> list[Device]:
    """`nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]` -> one Device per GPU row.

    With a header the columns are found by name, in whatever order they were asked for
    ("memory.total [MiB]" counts as memory.total); without one they are `fields`, in order (what
    hanlin asks for). A row that does not fit the columns, or whose index is not a number, is not
    a GPU (nvidia-smi prints "No devices were found" and driver errors on stdout too).
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return []
    columns = list(fields)
    header = [cell.strip() for cell in lines[0].split(",")]
    if all(_HEADER_CELL.match(cell) for cell in header):
        columns = [re.sub(r"\s*\[.*\]$", "", cell) for cell in header]
        lines = lines[1:]
    devices: list[Device] = []
    for line in lines:
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) > len(columns) and "name" in columns:  # a product name with a comma in it
            i, extra = columns.index("name"), len(cells) - len(columns)
            cells[i : i + extra + 1] = [", ".join(cells[i : i + extra + 1])]
        if len(cells) != len(columns):
            continue
        row = dict(zip(columns, cells))
        if "index" in row and not row["index"].isdigit():
            continue
        cc = row.get("compute_cap")
        devices.append(Device(
            kind="cuda",
            index=int(row["index"]) if "index" in row else len(devices),
            name=row.get("name") or "NVIDIA GPU",
            memory_total=_mib(row.get("memory.total", "")),
            memory_free=_mib(row.get("memory.free", "")),
            dtypes=gpu_dtypes(cc),
            features=(f"compute_capability={cc}",) if _version_tuple(cc) else (),
            driver=row.get("driver_version") or None,
        ))  # fmt: skip
    return devices


def parse_nvidia_driver_version(text: str) -> str | None:
    """The driver version from /proc/driver/nvidia/version, proprietary or open kernel module:
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.173.02  ..." or
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  565.57.01  Release Build ..."."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d[\w.]*)", text or "")
    return m.group(1) if m else None


def nvidia_driver_present(exists: Callable[[str], bool] = os.path.exists) -> bool:
    """The loaded NVIDIA kernel driver shows itself here on Linux; a sign worth importing torch for."""
    return exists("/proc/driver/nvidia/version") or exists("/dev/nvidiactl")


def _torch_available() -> bool:
    return "torch" in sys.modules or installed("torch")


def probe_nvidia() -> tuple[list[Device], str | None]:
    """CUDA GPUs here, or none and why. Never raises."""
    driver = nvidia_driver_present()
    reasons: list[str] = []
    if driver and _torch_available():
        devices, why = probe_torch_cuda()
        if devices:
            return devices, None
        reasons.append(why or "torch sees no CUDA device")
    out, why = run_tool(NVIDIA_SMI)
    if out is None:
        reasons.append(why if driver else f"no NVIDIA driver (/proc/driver/nvidia missing) and {why}")
        return [], "; ".join(reasons)
    devices = parse_nvidia_smi_csv(out)
    if not devices:
        reasons.append(f"nvidia-smi listed no GPU ({first_line(out)})")
        return [], "; ".join(reasons)
    devices, hidden = keep_visible(devices, os.environ.get("CUDA_VISIBLE_DEVICES"), "CUDA_VISIBLE_DEVICES")
    return (devices, None) if devices else ([], hidden)


def probe_torch_cuda() -> tuple[list[Device], str | None]:
    """CUDA devices as torch sees them (after CUDA_VISIBLE_DEVICES), with free memory from the driver."""
    try:
        import torch

        if not torch.cuda.is_available():
            return [], "torch.cuda.is_available() is False"
        driver = parse_nvidia_driver_version(read_text("/proc/driver/nvidia/version") or "")
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            cc = f"{props.major}.{props.minor}"
            devices.append(Device(
                kind="cuda", index=i, name=props.name, memory_total=int(total), memory_free=int(free),
                dtypes=gpu_dtypes(cc), features=(f"compute_capability={cc}",), driver=driver,
            ))  # fmt: skip
        return devices, None if devices else "torch sees no CUDA device"
    except Exception as e:  # noqa: BLE001  a broken CUDA install is a reason, not a crash
        return [], f"torch could not query CUDA: {type(e).__name__}: {e}"
