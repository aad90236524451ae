"""Huawei Ascend NPUs: through torch_npu when it and the driver are installed, else `npu-smi info`.

`import torch_npu` without Ascend's CANN libraries can fail in unusual ways (missing .so files,
SystemExit from its own checks), so it is only tried where a driver is present, and any failure
short of Ctrl-C becomes a reason. Otherwise the npu-smi table is parsed by a pure function tested
on recorded real outputs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

from hanlin.devices.device import Device, keep_visible
from hanlin.devices.tools import first_line, installed, run_tool

MiB = 1 << 20
# "| 0     910B3               | OK            | 97.5        41                0    / 0             |"
_NAME_ROW = re.compile(r"^\|\s*(\d+)\s+([A-Za-z0-9][\w\-]*)\s*\|\s*([A-Za-z]+)\s*\|")
# "| 0                         | 0000:C1:00.0  | 0           0    / 0          3379 / 65536         |"
# "| 1     15                  | 0000:83:00.0  | ..."   (A3: chip id and physical id)
_CHIP_ROW = re.compile(r"^\|\s*(\d+)(?:\s+\d+)?\s*\|\s*([0-9A-Fa-fx]{4}:[0-9A-Fa-fx]{2}:[0-9A-Fa-fx]{2}\.[0-9A-Fa-fx])\s*\|(.*)\|")
_USAGE = re.compile(r"(\d+)\s*/\s*(\d+)")


def npu_dtypes(name: str) -> tuple[str, ...]:
    """bfloat16 on the 910B family (910B1..910B4-1, "Ascend910B3") and the A3 parts (npu-smi shows
    "Ascend910", torch_npu "Ascend910_93xx"); the first 910 (910A, 910ProA/ProB, 910PremiumA and a
    bare "910B") and the 310 cards compute float16."""
    soc = name.removeprefix("Ascend").strip()
    if re.match(r"910B\d", soc) or soc == "910" or soc.startswith(("910_93", "910C")):
        return ("float32", "bfloat16", "float16")
    return ("float32", "float16")


def parse_npu_smi_info(text: str) -> list[Device]:
    """`npu-smi info` -> one Device per chip, numbered in table order (as torch_npu numbers them).

    Each chip has two rows: "NPU Name | Health | Power Temp Hugepages" then "Chip [Phy-ID] |
    Bus-Id | AICore Memory-Usage(MB) [HBM-Usage(MB)]". An A3 NPU has two chips under one NPU id.
    Memory is the HBM pair ("3162 / 65536", MB) when the card has HBM, else Memory-Usage (310P).
    The process table that may follow the chips matches neither row and is skipped.
    """
    m = re.search(r"Version:\s*(\d[\w.\-]*)", text) or re.search(r"npu-smi\s+(\d[\w.\-]*)", text)
    version = m.group(1) if m else None
    devices: list[Device] = []
    name: str | None = None
    for line in text.splitlines():  # process-table rows match neither row format
        chip = _CHIP_ROW.match(line)
        if chip:
            if name is None:
                continue  # a chip row without its name row: not a table we understand
            pairs = [(int(used), int(total)) for used, total in _USAGE.findall(chip.group(3))]
            used, total = pairs[-1] if pairs else (0, 0)  # HBM is the last column when present
            full = name if name.startswith("Ascend") else f"Ascend{name}"
            devices.append(Device(
                kind="npu", index=len(devices), name=full, memory_total=total * MiB or None,
                memory_free=(total - used) * MiB if total else None, dtypes=npu_dtypes(full), driver=version,
            ))  # fmt: skip
            name = None  # every chip row follows its own name row
        elif row := _NAME_ROW.match(line):
            name = row.group(2)
    return devices


def ascend_driver_present(isdir: Callable[[str], bool] = os.path.isdir, which: Callable[[str], str | None] = shutil.which) -> bool:
    return isdir("/usr/local/Ascend") or which("npu-smi") is not None


def _torch_npu_installed() -> bool:
    return installed("torch_npu")


def probe_ascend() -> tuple[list[Device], str | None]:
    """Ascend NPU chips here, or none and why. Never raises."""
    driver = ascend_driver_present()
    reasons: list[str] = []
    if driver and _torch_npu_installed():
        devices, why = probe_torch_npu()
        if devices:
            return devices, None
        reasons.append(why or "torch_npu sees no NPU")
    out, why = run_tool(["npu-smi", "info"])
    if out is None:
        reasons.append(why if driver else f"no Ascend driver (/usr/local/Ascend missing) and {why}")
        return [], "; ".join(reasons)
    devices = parse_npu_smi_info(out)
    if not devices:
        reasons.append(f"npu-smi info listed no NPU ({first_line(out)})")
        return [], "; ".join(reasons)
    devices, hidden = keep_visible(devices, os.environ.get("ASCEND_RT_VISIBLE_DEVICES"), "ASCEND_RT_VISIBLE_DEVICES")
    return (devices, None) if devices else ([], hidden)


def probe_torch_npu() -> tuple[list[Device], str | None]:
    """NPU chips as torch_npu sees them (after ASCEND_RT_VISIBLE_DEVICES)."""
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)

        devices = []
        for i in range(torch.npu.device_count()):
            free, total = torch.npu.mem_get_info(i)
            name = str(torch.npu.get_device_name(i))
            devices.append(Device(kind="npu", index=i, name=name, memory_total=int(total), memory_free=int(free),
                                  dtypes=npu_dtypes(name)))  # fmt: skip
        return devices, None if devices else "torch_npu sees no NPU"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001  without CANN, `import torch_npu` can even raise SystemExit
        return [], f"torch_npu could not query the NPUs: {type(e).__name__}: {e}"
