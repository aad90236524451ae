"""Shared by the terminal app's tests: a recorded device report, and waiting in a Pilot."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def recorded_report(with_gpus: bool = True):
    """This machine's CPU as `hanlin devices --json` recorded it, plus (with_gpus) four A800s
    parsed by the real parser from a recorded nvidia-smi: the same screen on every run."""
    from hanlin.devices.device import Device, DeviceReport
    from hanlin.devices.nvidia import parse_nvidia_smi_csv

    data = json.loads((FIXTURES / "tui" / "devices-here.json").read_text())
    keep = {f for f in Device.__dataclass_fields__}
    devices = []
    for d in data["devices"]:
        d = {k: v for k, v in d.items() if k in keep}
        devices.append(Device(**d))
    notes = dict(data["notes"])
    if with_gpus:
        devices += parse_nvidia_smi_csv((FIXTURES / "devices" / "nvidia_smi_a800x4.csv").read_text())
        notes.pop("cuda", None)
    return DeviceReport(devices, notes)


def run(app, script, size=(120, 40)) -> None:
    """Run the app headless at size and drive it with `await script(pilot)`."""

    async def main():
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(pilot)
            await pilot.pause(0.1)  # let a screen pushed last finish mounting before the app exits

    asyncio.run(main())


async def wait_until(pilot, predicate, timeout: float = 60.0, what: str = "the condition") -> None:
    """Let the app run until predicate() holds; fail with `what` after timeout seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; screen is {type(pilot.app.screen).__name__}")


def text_of(widget) -> str:
    """The plain text a Static (or Label) shows."""
    return str(widget.render())
