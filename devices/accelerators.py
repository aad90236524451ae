"""NVIDIA GPUs, Ascend NPUs and Apple MPS.

Each probe returns (devices, reason): devices found, or none and the reason in words. The
vendor library (torch, torch_npu) is used only when it is installed AND the driver is there,
because importing torch costs seconds and importing torch_npu without Ascend's CANN
libraries can fail hard; otherwise the vendor's command-line tool is asked, and its output is
parsed by a pure function tested on recorded real outputs.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

from hanlin.devices.device import Device

MiB = 1 << 20
NVIDIA_QUERY = ("index", "name", "memory.total", "memory.free", "compute_cap", "driver_version")


def run_tool(cmd: list[str], timeout: float = 5.0) -> tuple[str | None, str | None]:
    """(stdout, None) or (None, why it could not be run). Never raises."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None, f"{cmd[0]} not found on PATH"
    try:
        proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"{cmd[0]} did not answer within {timeout:.0f} s"
    except OSError as e:
        return None, f"{cmd[0]} could not be run: {e.strerror}"
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"{cmd[0]} failed (exit {proc.returncode}): {msg[0] if msg else 'no output'}"
    return proc.stdout, None


def _num(value: str) -> float | None:
    m = re.search(r"[-+]?\d+(?:\.\d+)?", value or "")
    return float(m.group()) if m and "N/A" not in value else None


# --------------------------------------------------------------------------------------
# NVIDIA
# --------------------------------------------------------------------------------------


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = NVIDIA_QUERY) -> list[Device]:
    """`nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]` -> Devices.

    With a header line the columns are found by name ("memory.total [MiB]"); without one they
    are taken in the order of `fields`. Memory is MiB ("81559 MiB" or "81559"); "[N/A]" (e.g.
    unified-memory GB10) becomes None.
    """
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    if not lines:
        return []
    cols = list(fields)
    if lines[0].lower().startswith(("index", "name")) or "memory.total" in lines[0]:
        cols = [re.sub(r"\s*\[.*?\]$", "", c.strip()) for c in lines[0].split(",")]
        lines = lines[1:]
    devices = []
    for pos, line in enumerate(lines):
        values = [v.strip() for v in line.split(",")]
        if len(values) > len(cols):  # a name with commas in it: glue the extra pieces back
            extra = len(values) - len(cols)
            i = cols.index("name") if "name" in cols else 0
            values[i : i + extra + 1] = [", ".join(values[i : i + extra + 1])]
        row = dict(zip(cols, values))
        if "name" not in row:
            continue
        total, free = _num(row.get("memory.total", "")), _num(row.get("memory.free", ""))
        cc = row.get("compute_cap", "")
        cc_num = _num(cc)
        features = (f"compute_capability={cc}",) if cc_num is not None else ()
        dtypes = ("float32", "float16") + (("bfloat16",) if cc_num is not None and cc_num >= 8.0 else ())
        index = int(_num(row["index"])) if _num(row.get("index", "")) is not None else pos
        devices.append(Device(
            kind="cuda", index=index, name=row["name"],
            memory_total=int(total * MiB) if total is not None else None,
            memory_free=int(free * MiB) if free is not None else None,
            dtypes=dtypes, features=features, driver=row.get("driver_version") or None,
        ))  # fmt: skip
    return devices


def nvidia_driver_present(exists=os.path.exists) -> bool:
    return exists("/proc/driver/nvidia/version") or exists("/dev/nvidiactl")


def probe_nvidia() -> tuple[list[Device], str | None]:
    if nvidia_driver_present() and ("torch" in sys.modules or importlib.util.find_spec("torch") is not None):
        devs, why = _probe_torch_cuda()
        if devs:
            return devs, None
    out, why = run_tool(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_QUERY)}", "--format=csv,noheader,nounits"])
    if out is None:
        if not nvidia_driver_present():
            return [], f"no NVIDIA driver (/proc/driver/nvidia missing) and {why}"
        return [], why
    devs = parse_nvidia_smi_csv(out)
    return (devs, None) if devs else ([], "nvidia-smi lists no GPU")


def _probe_torch_cuda() -> tuple[list[Device], str | None]:
    try:
        import torch

        if not torch.cuda.is_available():
            return [], "torch.cuda.is_available() is False"
        devs = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            cc = f"{p.major}.{p.minor}"
            dtypes = ("float32", "float16") + (("bfloat16",) if p.major >= 8 else ())
            devs.append(Device(kind="cuda", index=i, name=p.name, memory_total=total, memory_free=free, dtypes=dtypes,
                               features=(f"compute_capability={cc}",), driver=torch.version.cuda))  # fmt: skip
        return devs, None
    except Exception as e:
        return [], f"torch could not query CUDA: {e}"


# --------------------------------------------------------------------------------------
# Ascend
# --------------------------------------------------------------------------------------

_ROW = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*(\S+)\s*\|")  # "| 0     910B3    | OK   |"
_CHIP = re.compile(r"^\|\s*(\d+)(?:\s+(\d+))?\s*\|\s*([0-9A-Fa-fx:.]+)\s*\|(.*)\|")  # "| 0  [phy] | 0000:C1:00.0 | ... |"
_USAGE = re.compile(r"(\d+)\s*/\s*(\d+)")


def parse_npu_smi_info(text: str) -> list[Device]:
    """`npu-smi info` -> one Device per chip.

    The table has two rows per chip: "NPU Name | Health | Power Temp Hugepages" and
    "Chip [Phy-ID] | Bus-Id | AICore Memory-Usage(MB) HBM-Usage(MB)". 910B reports its memory in
    HBM-Usage ("3162 / 65536"); cards without HBM (310P) in Memory-Usage. Chips are numbered in
    order, which is how torch_npu and ASCEND_RT_VISIBLE_DEVICES number them. The process table
    after the chips is ignored.
    """
    version = None
    m = re.search(r"npu-smi\s+(\S+)", text)
    if m:
        version = m.group(1)
    devices: list[Device] = []
    name = None
    for line in text.splitlines():
        if "Process id" in line or "Process name" in line:
            break  # the process table follows the chips
        row = _ROW.match(line)
        if row and not _CHIP.match(line):
            name = row.group(2)
            continue
        chip = _CHIP.match(line)
        if chip and name:
            usages = _USAGE.findall(chip.group(4))
            # the last "used / total" pair is HBM when present, otherwise Memory-Usage
            used, total = (int(x) for x in (usages[-1] if usages else ("0", "0")))
            if total == 0 and len(usages) > 1:
                used, total = (int(x) for x in usages[0])
            full = name if name.lower().startswith("ascend") else f"Ascend {name}"
            dtypes = ("float32", "float16", "bfloat16") if _has_bf16(name) else ("float32", "float16")
            devices.append(Device(kind="npu", index=len(devices), name=full, memory_total=total * MiB if total else None,
                                  memory_free=(total - used) * MiB if total else None, dtypes=dtypes, driver=version))  # fmt: skip
            name = None  # every chip row follows its own name row
    return devices


def _has_bf16(name: str) -> bool:
    """910B / 910C (A3, 'Ascend910' with Phy-IDs) have bf16; the first 910 (910A/ProA/ProB) and 310 do not."""
    n = name.upper().replace("ASCEND", "")
    return n.startswith("910B") or n.startswith("910C") or n == "910" or n.startswith("910_93")


def probe_ascend() -> tuple[list[Device], str | None]:
    cann = os.path.isdir("/usr/local/Ascend") or shutil.which("npu-smi") is not None
    if cann and importlib.util.find_spec("torch_npu") is not None:
        devs, why = _probe_torch_npu()
        if devs:
            return devs, None
    out, why = run_tool(["npu-smi", "info"])
    if out is None:
        return [], why if cann else f"no Ascend driver (/usr/local/Ascend missing) and {why}"
    devs = parse_npu_smi_info(out)
    return (devs, None) if devs else ([], "npu-smi lists no NPU")


def _probe_torch_npu() -> tuple[list[Device], str | None]:
    try:
        import torch
        import torch_npu  # noqa: F401

        n = torch.npu.device_count()
        devs = []
        for i in range(n):
            free, total = torch.npu.mem_get_info(i)
            name = torch.npu.get_device_name(i)
            dtypes = ("float32", "float16", "bfloat16") if _has_bf16(name) else ("float32", "float16")
            devs.append(Device(kind="npu", index=i, name=name, memory_total=total, memory_free=free, dtypes=dtypes))
        return devs, None if devs else "torch_npu sees no NPU"
    except Exception as e:
        return [], f"torch_npu could not query the NPUs: {e}"


# --------------------------------------------------------------------------------------
# Apple
# --------------------------------------------------------------------------------------


def probe_mps(system: str | None = None) -> tuple[list[Device], str | None]:
    system = system or platform.system()
    if system != "Darwin":
        return [], "not macOS"
    if platform.machine() != "arm64":
        return [], "not Apple silicon"
    if importlib.util.find_spec("torch") is None:
        return [], "torch not installed (MPS is used through torch)"
    try:
        import torch

        if not torch.backends.mps.is_available():
            return [], "torch.backends.mps.is_available() is False"
        out, _ = run_tool(["sysctl", "-n", "hw.memsize"])
        total = int(out.strip()) if out and out.strip().isdigit() else None
        return [Device(kind="mps", name="Apple GPU", memory_total=total, dtypes=("float32", "float16", "bfloat16"))], None
    except Exception as e:
        return [], f"torch could not query MPS: {e}"
