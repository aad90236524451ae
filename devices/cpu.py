"""The CPU: /proc/cpuinfo and /proc/meminfo on Linux and Android, `sysctl` on macOS.

The features reported are only the ones that decide kernels and dtypes (AVX2/AVX-512/AMX on x86,
NEON/dotprod/i8mm/bf16/SVE on ARM), under one normalized spelling, so a backend asks
`"avx512_bf16" in device.features` instead of parsing vendor flag lists itself.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hanlin.devices.device import Device
from hanlin.devices.tools import read_text, run_tool

# /proc/cpuinfo "flags" (x86) -> feature name
X86_FLAGS = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
    "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16", "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
}  # fmt: skip
# /proc/cpuinfo "Features" (ARM) -> feature name. 64-bit kernels say "asimd", 32-bit ones "neon".
ARM_FLAGS = {
    "asimd": "neon", "neon": "neon", "fphp": "fp16", "asimdhp": "asimdhp", "asimddp": "dotprod",
    "i8mm": "i8mm", "bf16": "bf16", "sve": "sve", "sve2": "sve2",
}  # fmt: skip
# macOS: `sysctl hw` keys on Apple silicon (old hw.optional.* and macOS 12+ hw.optional.arm.FEAT_*)
MAC_ARM_KEYS = {
    "hw.optional.neon": ("neon",), "hw.optional.arm.AdvSIMD": ("neon",),
    "hw.optional.neon_fp16": ("fp16", "asimdhp"), "hw.optional.arm.FEAT_FP16": ("fp16", "asimdhp"),
    "hw.optional.arm.FEAT_DotProd": ("dotprod",), "hw.optional.arm.FEAT_I8MM": ("i8mm",),
    "hw.optional.arm.FEAT_BF16": ("bf16",),
}  # fmt: skip
# macOS on Intel: tokens of machdep.cpu.features / machdep.cpu.leaf7_features
MAC_X86_TOKENS = {"AVX1.0": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni"}

# MIDR implementer / (implementer, part) -> names, for ARM cpuinfo without a "model name"
ARM_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x48": "HiSilicon", "0x4e": "NVIDIA",
    "0x51": "Qualcomm", "0x53": "Samsung", "0x61": "Apple", "0xc0": "Ampere",
}  # fmt: skip
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd05"): "Cortex-A55", ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73", ("0x41", "0xd0a"): "Cortex-A75",
    ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd46"): "Cortex-A510", ("0x41", "0xd47"): "Cortex-A710", ("0x41", "0xd48"): "Cortex-X2",
    ("0x41", "0xd49"): "Neoverse-N2", ("0x41", "0xd4d"): "Cortex-A715", ("0x41", "0xd4e"): "Cortex-X3",
    ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd80"): "Cortex-A520", ("0x41", "0xd81"): "Cortex-A720",
    ("0x41", "0xd82"): "Cortex-X4", ("0x41", "0xd83"): "Neoverse-V3AE", ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd85"): "Cortex-X925", ("0x41", "0xd87"): "Cortex-A725",
    ("0x48", "0xd01"): "TaiShan-v110",  # Kunpeng 920, the usual host CPU of Ascend servers
    ("0xc0", "0xac3"): "Ampere1", ("0xc0", "0xac4"): "Ampere1A",
}  # fmt: skip


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says, normalized (see parse_cpuinfo)."""

    arch: str  # "x86" or "arm"
    name: str
    physical_cores: int | None
    logical_cores: int | None
    features: tuple[str, ...]


def _blocks(text: str) -> list[dict[str, str]]:
    """Split /proc/cpuinfo into one dict per blank-line separated block, keys lower-cased."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_cpuinfo(text: str) -> CpuInfo:
    """Name, core counts and features from /proc/cpuinfo, x86 or ARM.

    x86 has a "flags" line per processor; physical cores are the distinct ("physical id",
    "core id") pairs, so hyper-threads are not counted twice. ARM has a "Features" line, no SMT,
    and usually no "model name": the name comes from the board ("Model", as on a Raspberry Pi,
    whose "Hardware" line says BCM2835 on every model), the SoC ("Hardware", older Android), or
    is built from the MIDR implementer and part numbers ("ARM Cortex-A55 + Cortex-A76").
    """
    blocks = _blocks(text)
    procs = [b for b in blocks if b.get("processor", "").isdigit()]
    board: dict[str, str] = {}  # Hardware / Model: a trailer block, or inside the one block of old kernels
    for block in blocks:
        board.update({k: v for k, v in block.items() if k in ("hardware", "model")})
    # count "processor : N" lines, not blocks: old Android kernels (3.10) list them all in one block
    logical = len(re.findall(r"^processor\s*:\s*\d+\s*$", text, flags=re.MULTILINE)) or None
    first = procs[0] if procs else (blocks[0] if blocks else {})

    if "flags" in first:
        flags = set(first["flags"].split())
        features = tuple(sorted({name for flag, name in X86_FLAGS.items() if flag in flags}))
        pairs = {(p["physical id"], p["core id"]) for p in procs if "physical id" in p and "core id" in p}
        physical = len(pairs) if pairs else logical
        return CpuInfo("x86", first.get("model name") or "x86 CPU", physical, logical, features)

    flags = set()
    for proc in procs or [first]:
        flags |= set(proc.get("features", "").split())  # big.LITTLE cores may differ: take the union
    features = tuple(sorted({name for flag, name in ARM_FLAGS.items() if flag in flags}))
    name = board.get("model") or board.get("hardware") or _arm_core_names(procs or [first])
    return CpuInfo("arm", name, logical, logical, features)


def _arm_core_names(procs: list[dict[str, str]]) -> str:
    implementer = procs[0].get("cpu implementer", "").lower()
    parts: list[str] = []
    for proc in procs:
        key = (proc.get("cpu implementer", "").lower(), proc.get("cpu part", "").lower())
        part = ARM_PARTS.get(key, f"part {key[1]}" if key[1] else "")
        if part and part not in parts:
            parts.append(part)
    vendor = ARM_IMPLEMENTERS.get(implementer, "ARM")
    if not parts:
        return f"{vendor} CPU"
    cores = " + ".join(parts)
    return cores if cores.startswith(vendor) else f"{vendor} {cores}"  # "Ampere1A", not "Ampere Ampere1A"


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo (kB there); MemFree if MemAvailable is absent."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl name ...` output ("name: value" per line) -> {name: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def cpu_dtypes(features: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Float types the CPU computes natively: bfloat16 with AVX512-BF16/AMX-BF16/ARM BF16,
    float16 with AVX512-FP16 or ARM half-precision arithmetic. float32 always."""
    have = set(features)
    dtypes = ["float32"]
    if have & {"avx512_bf16", "amx_bf16", "bf16"}:
        dtypes.append("bfloat16")
    if have & {"avx512_fp16", "fp16", "asimdhp"}:
        dtypes.append("float16")
    return tuple(dtypes)


def is_android(environ: Mapping[str, str] | None = None, exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Android (or Termux on it): the phone case, where only small quantized models make sense."""
    env = os.environ if environ is None else environ
    if any(key in env for key in ("ANDROID_ROOT", "ANDROID_DATA", "TERMUX_VERSION")):
        return True
    return exists("/system/build.prop")


def device_from_cpuinfo(cpuinfo: str, meminfo: str | None, *, phone: bool = False) -> Device:
    info = parse_cpuinfo(cpuinfo)
    total, available = parse_meminfo(meminfo) if meminfo else (None, None)
    return Device(
        kind="cpu", name=info.name, memory_total=total, memory_free=available, dtypes=cpu_dtypes(info.features),
        features=info.features, physical_cores=info.physical_cores, logical_cores=info.logical_cores, is_phone=phone,
    )  # fmt: skip


def device_from_sysctl(text: str) -> Device:
    """The CPU from `sysctl hw machdep` output (one call gives memory, names, counts and features)."""
    values = parse_sysctl(text)
    features: set[str] = set()
    for key, names in MAC_ARM_KEYS.items():
        if values.get(key) == "1":
            features.update(names)
    tokens = f"{values.get('machdep.cpu.features', '')} {values.get('machdep.cpu.leaf7_features', '')}".split()
    features.update(MAC_X86_TOKENS[t] for t in tokens if t in MAC_X86_TOKENS)
    feats = tuple(sorted(features))
    return Device(
        kind="cpu", name=values.get("machdep.cpu.brand_string") or "Mac CPU", memory_total=_int(values.get("hw.memsize")),
        dtypes=cpu_dtypes(feats), features=feats, physical_cores=_int(values.get("hw.physicalcpu")),
        logical_cores=_int(values.get("hw.logicalcpu")),
    )  # fmt: skip


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def probe_cpu(system: str | None = None) -> tuple[list[Device], str | None]:
    """This machine's CPU. Always returns one Device; the reason says what could not be read."""
    system = system or platform.system()
    try:
        if system == "Darwin":
            out, why = run_tool(["sysctl", "hw", "machdep"])
            if out:
                return [device_from_sysctl(out)], None
            reason = f"sysctl gave nothing: {why}"
        else:
            cpuinfo = read_text("/proc/cpuinfo")
            if cpuinfo and cpuinfo.strip():
                return [device_from_cpuinfo(cpuinfo, read_text("/proc/meminfo"), phone=is_android())], None
            reason = "/proc/cpuinfo is not readable here"
    except Exception as e:  # noqa: BLE001  a strange /proc must not stop the program: fall back below
        reason = f"could not read the CPU description: {type(e).__name__}: {e}"
    n = os.cpu_count()
    name = platform.processor() or platform.machine() or "CPU"
    return [Device(kind="cpu", name=name, logical_cores=n, physical_cores=n)], reason
