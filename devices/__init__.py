"""What hardware is here and what it can do.

    from hanlin.devices import detect, get_device
    report = detect()            # every device found, and why the others were not
    dev = get_device("cuda:1")   # or raise DeviceNotFound naming what was detected

One `Device` description flows from here through every layer; nobody re-probes hardware on
their own. This package imports nothing else of hanlin's and no vendor library at import
time; probes never raise: a missing library or a failing tool is a reason, not an error.
"""

from __future__ import annotations

import re

from hanlin.devices.accelerators import parse_npu_smi_info, parse_nvidia_smi_csv, probe_ascend, probe_mps, probe_nvidia
from hanlin.devices.cpu import device_from_cpuinfo, device_from_sysctl, parse_cpuinfo, parse_meminfo, parse_sysctl, probe_cpu
from hanlin.devices.device import KINDS, Device, DeviceNotFound, DeviceReport

__all__ = [
    "Device", "DeviceReport", "DeviceNotFound", "KINDS", "detect", "get_device",
    "probe_cpu", "probe_nvidia", "probe_ascend", "probe_mps",
    "parse_cpuinfo", "parse_meminfo", "parse_sysctl", "parse_nvidia_smi_csv", "parse_npu_smi_info",
    "device_from_cpuinfo", "device_from_sysctl",
]  # fmt: skip

PROBES = {"cuda": probe_nvidia, "npu": probe_ascend, "mps": probe_mps}
_CACHE: DeviceReport | None = None
_SPEC = re.compile(r"^(cpu|cuda|npu|mps)(?::(\d+))?$")


def detect(refresh: bool = False) -> DeviceReport:
    """Probe every kind of device once per process (refresh=True probes again)."""
    global _CACHE
    if _CACHE is not None and not refresh:
        return _CACHE
    cpus, cpu_note = probe_cpu()
    devices = list(cpus)
    notes = {"cpu": cpu_note} if cpu_note else {}
    for kind, probe in PROBES.items():
        try:
            found, why = probe()
        except Exception as e:  # a probe bug must not stop the program
            found, why = [], f"probe failed: {type(e).__name__}: {e}"
        devices += found
        if not found:
            notes[kind] = why or "none found"
    _CACHE = DeviceReport(devices, notes)
    return _CACHE


def get_device(spec: str = "auto") -> Device:
    """Resolve "auto", "cpu", "cuda", "cuda:1", "npu", "npu:0", "mps" to a Device here."""
    if isinstance(spec, Device):
        return spec
    text = str(spec).strip().lower()
    report = detect()
    if text == "auto":
        return report.best()
    m = _SPEC.match(text)
    if not m:
        raise DeviceNotFound(
            f"{spec!r} is not a device name; use auto, cpu, cuda, cuda:N, npu, npu:N or mps "
            f"(detected: {report.describe()})"
        )
    kind, index = m.group(1), m.group(2)
    same = [d for d in report.devices if d.kind == kind]
    if not same:
        why = report.notes.get(kind, "none found")
        raise DeviceNotFound(f"no {kind} device here: {why}; detected: {report.describe()}")
    if index is None:
        return same[0]
    for d in same:
        if d.index == int(index):
            return d
    have = ", ".join(d.spec() for d in same)
    raise DeviceNotFound(f"{kind}:{index} does not exist; this machine has {have}")
