"""Probe once per process (detect), and turn a user's device name ("cuda:1") into a Device or a clear error."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from hanlin.devices.apple import probe_mps
from hanlin.devices.ascend import probe_ascend
from hanlin.devices.cpu import probe_cpu
from hanlin.devices.device import Device, DeviceNotFound, DeviceReport
from hanlin.devices.nvidia import probe_nvidia

Probe = Callable[[], tuple[list[Device], str | None]]  # (devices found, or none and why)
# Accelerator kinds in report order; the CPU is probed first and always present.
PROBES: dict[str, Probe] = {"cuda": probe_nvidia, "npu": probe_ascend, "mps": probe_mps}

_SPEC = re.compile(r"^(cpu|cuda|npu|mps)(?::(\d+))?$")
_VALID = "auto, cpu, cuda, cuda:N, npu, npu:N or mps"
_HINTS = {"gpu": "cuda", "nvidia": "cuda", "ascend": "npu", "metal": "mps", "apple": "mps"}
_cache: DeviceReport | None = None
_lock = threading.Lock()


def _run(kind: str, probe: Probe) -> tuple[list[Device], str | None]:
    try:
        return probe()
    except Exception as e:  # noqa: BLE001  probes do not raise by design; a bug in one must not hide the others
        return [], f"{kind} probe failed: {type(e).__name__}: {e}"


def detect(refresh: bool = False) -> DeviceReport:
    """Every device on this machine and, for each kind not found, why. Cached per process
    (probing can run vendor tools and import torch); refresh=True probes again."""
    global _cache
    with _lock:
        if _cache is not None and not refresh:
            return _cache
        cpus, cpu_note = _run("cpu", probe_cpu)
        devices = list(cpus) or [Device(kind="cpu", name="CPU")]
        notes = {"cpu": cpu_note} if cpu_note else {}
        for kind, probe in PROBES.items():
            found, why = _run(kind, probe)
            devices.extend(found)
            if not found:
                notes[kind] = why or "none found"
        _cache = DeviceReport(devices, notes)
        return _cache


def get_device(spec: str | Device = "auto") -> Device:
    """The Device named by `spec`: "auto" (best accelerator, else the CPU), "cpu", "cuda", "cuda:1",
    "npu", "npu:0" or "mps". Raises DeviceNotFound naming what was asked and what is here."""
    if isinstance(spec, Device):
        return spec
    text = str(spec).strip().lower()
    report = detect()
    if text == "auto":
        return report.best()
    m = _SPEC.match(text)
    if not m:
        hint = _HINTS.get(text.split(":")[0])
        suggestion = f" (did you mean {hint!r}?)" if hint else ""
        raise DeviceNotFound(
            f"{spec!r} is not a device name{suggestion}; use {_VALID} (N a number); detected: {report.describe()}"
        )
    kind, index = m.group(1), m.group(2)
    same = [d for d in report.devices if d.kind == kind]
    if not same:
        why = report.notes.get(kind, "none found")
        raise DeviceNotFound(f"no {kind} device here: {why}; detected: {report.describe()}")
    if index is None:
        return same[0]
    for dev in same:
        if dev.index == int(index):
            return dev
    raise DeviceNotFound(f"{text} does not exist; this machine has {', '.join(d.spec() for d in same)}")
