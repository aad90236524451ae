"""The Apple GPU through PyTorch's MPS backend (the only way hanlin's engines reach it besides
llama.cpp's Metal build, which needs no probe). Its memory is the Mac's unified memory."""

from __future__ import annotations

import platform

from hanlin.devices.device import Device
from hanlin.devices.tools import installed, run_tool


def _torch_installed() -> bool:
    return installed("torch")


def probe_mps(system: str | None = None) -> tuple[list[Device], str | None]:
    """The MPS device on macOS when torch can use it, or none and why. Never raises.

    `system` is platform.system() unless given (tests pass "Darwin" or "Linux").
    """
    system = system or platform.system()
    if system != "Darwin":
        return [], "not macOS"
    if not _torch_installed():
        return [], "torch not installed (MPS is reached through torch)"
    try:
        import torch

        if not torch.backends.mps.is_available():
            return [], "torch.backends.mps.is_available() is False (needs macOS 12.3+ and a Metal GPU)"
        out, _ = run_tool(["sysctl", "-n", "hw.memsize", "machdep.cpu.brand_string"])
        lines = (out or "").strip().splitlines()
        memory = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        chip = lines[1].strip() if len(lines) > 1 else "Apple"
        dtypes = ("float32", "bfloat16", "float16") if _mps_has_bf16(torch) else ("float32", "float16")
        return [Device(kind="mps", name=f"{chip} GPU", memory_total=memory, dtypes=dtypes)], None
    except Exception as e:  # noqa: BLE001  (a broken torch is a reason, not a crash)
        return [], f"torch could not query MPS: {type(e).__name__}: {e}"


def _mps_has_bf16(torch) -> bool:
    """bfloat16 on MPS depends on the macOS and torch versions; asking for one element settles it."""
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        return True
    except Exception:  # noqa: BLE001  (any failure means: not supported here)
        return False
