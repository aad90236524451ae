"""What hardware is here and what it can do.

    from hanlin.devices import detect, get_device
    report = detect()            # every device found, and why the other kinds were not
    dev = get_device("cuda:1")   # or DeviceNotFound naming what was asked and what was detected

One `Device` description flows from here through every layer; nobody re-probes hardware on their
own. This package imports nothing else of hanlin's and no vendor library at import time (torch and
torch_npu are imported inside the probes, and only where a driver is present). Probes never raise:
a missing library or a failing tool is a reason, not an error.
"""

from __future__ import annotations

from hanlin.devices.apple import probe_mps
from hanlin.devices.ascend import parse_npu_smi_info, probe_ascend
from hanlin.devices.cpu import (
    CpuInfo,
    device_from_cpuinfo,
    device_from_sysctl,
    parse_cpuinfo,
    parse_meminfo,
    parse_sysctl,
    probe_cpu,
)
from hanlin.devices.device import KINDS, Device, DeviceNotFound, DeviceReport
from hanlin.devices.lookup import PROBES, detect, get_device
from hanlin.devices.nvidia import (
    parse_nvidia_driver_version,
    parse_nvidia_smi_csv,
    probe_nvidia,
)

__all__ = [
    "Device", "DeviceReport", "DeviceNotFound", "KINDS", "detect", "get_device", "PROBES",
    "probe_cpu", "probe_nvidia", "probe_ascend", "probe_mps",
    "parse_cpuinfo", "parse_meminfo", "parse_sysctl", "parse_nvidia_smi_csv", "parse_nvidia_driver_version",
    "parse_npu_smi_info", "device_from_cpuinfo", "device_from_sysctl", "CpuInfo",
]  # fmt: skip
