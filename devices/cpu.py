"""The CPU: /proc/cpuinfo and /proc/meminfo on Linux and Android, sysctl on macOS."""

from __future__ import annotations

import os
import platform
import re
import subprocess

from hanlin.devices.device import Device

# /proc/cpuinfo flag -> hanlin feature name (the ones that decide kernels and dtypes)
X86_FEATURES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
    "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16", "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
}  # fmt: skip
ARM_FEATURES = {
    "asimd": "neon", "fphp": "fp16", "asimdhp": "asimdhp", "asimddp": "dotprod", "i8mm": "i8mm",
    "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme",
}  # fmt: skip
# macOS sysctl hw.optional.* -> feature
MAC_FEATURES = {
    "hw.optional.neon": "neon", "hw.optional.arm.FEAT_FP16": "fp16", "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.avx2_0": "avx2", "hw.optional.avx512f": "avx512f",
}  # fmt: skip
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x48": "HiSilicon", "0x4e": "NVIDIA",
                    "0x51": "Qualcomm", "0x53": "Samsung", "0x61": "Apple", "0xc0": "Ampere"}  # fmt: skip
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
             "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
             "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
             "0xd82": "Cortex-X4", "0xd87": "Cortex-A725", "0xd85": "Cortex-X925", "0xd01": "TaiShan-v110"}  # fmt: skip


def _blocks(text: str) -> list[dict[str, str]]:
    """Split /proc/cpuinfo into one dict per 'processor' block (and a trailer block)."""
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            cur[key.strip().lower()] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def parse_cpuinfo(text: str) -> dict:
    """name, physical_cores, logical_cores, features, arch ('x86' or 'arm') from /proc/cpuinfo."""
    blocks = _blocks(text)
    procs = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    extra = {k: v for b in blocks if b not in procs for k, v in b.items()}  # e.g. ARM 'Hardware'
    logical = len(procs) or None
    first = procs[0] if procs else {}
    if "flags" in first:  # x86
        flags = set(first["flags"].split())
        features = sorted({name for flag, name in X86_FEATURES.items() if flag in flags})
        cores = {(p.get("physical id", "0"), p.get("core id", p["processor"])) for p in procs}
        physical = len(cores) or logical
        if procs and "cpu cores" in first and "physical id" not in first:
            physical = int(first["cpu cores"])
        return {"arch": "x86", "name": first.get("model name", "x86 CPU"), "physical_cores": physical,
                "logical_cores": logical, "features": features}  # fmt: skip
    # ARM: every core lists its own Features; big.LITTLE phones mix parts
    flags = set()
    for p in procs:
        flags |= set(p.get("features", "").split())
    features = sorted({name for flag, name in ARM_FEATURES.items() if flag in flags})
    name = extra.get("hardware") or extra.get("model") or first.get("model name")
    if not name:
        impl = ARM_IMPLEMENTERS.get(first.get("cpu implementer", "").lower(), "ARM")
        parts = []
        for p in procs:
            part = ARM_PARTS.get(p.get("cpu part", "").lower(), p.get("cpu part", "?"))
            if part not in parts:
                parts.append(part)
        name = f"{impl} {' + '.join(parts)}" if parts else "ARM CPU"
    return {"arch": "arm", "name": name, "physical_cores": logical, "logical_cores": logical, "features": features}


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo."""
    values = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return values.get("MemTotal"), values.get("MemAvailable", values.get("MemFree"))


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl a b c` output ("name: value" lines) -> {name: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def cpu_dtypes(features: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    f = set(features)
    dtypes = ["float32"]
    if f & {"avx512_bf16", "amx_bf16", "bf16"}:
        dtypes.append("bfloat16")
    if f & {"avx512_fp16", "fp16", "asimdhp"}:
        dtypes.append("float16")
    return tuple(dtypes)


def is_android(environ=None, exists=os.path.exists) -> bool:
    env = os.environ if environ is None else environ
    if any(k in env for k in ("ANDROID_ROOT", "ANDROID_DATA", "TERMUX_VERSION")):
        return True
    return exists("/system/build.prop")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def device_from_cpuinfo(cpuinfo: str, meminfo: str | None, *, phone: bool = False) -> Device:
    info = parse_cpuinfo(cpuinfo)
    total, free = parse_meminfo(meminfo) if meminfo else (None, None)
    features = tuple(info["features"])
    return Device(
        kind="cpu", index=0, name=info["name"], memory_total=total, memory_free=free, dtypes=cpu_dtypes(features),
        features=features, physical_cores=info["physical_cores"], logical_cores=info["logical_cores"], is_phone=phone,
    )  # fmt: skip


def probe_cpu(system: str | None = None) -> tuple[list[Device], str | None]:
    """The CPU of this machine; never raises (a fallback Device says what it could not read)."""
    system = system or platform.system()
    try:
        if system == "Darwin":
            return [_probe_macos()], None
        cpuinfo = _read("/proc/cpuinfo")
        if cpuinfo:
            return [device_from_cpuinfo(cpuinfo, _read("/proc/meminfo"), phone=is_android())], None
    except Exception as e:  # a strange /proc must not stop chat
        reason = f"could not read the CPU description: {e}"
    else:
        reason = "/proc/cpuinfo is not readable here"
    n = os.cpu_count()
    return [Device(kind="cpu", name=platform.processor() or platform.machine() or "CPU", physical_cores=n, logical_cores=n)], reason


def _probe_macos() -> Device:
    keys = ["hw.memsize", "machdep.cpu.brand_string", "hw.physicalcpu", "hw.logicalcpu"]
    out = subprocess.run(["sysctl", *keys], capture_output=True, text=True, timeout=5).stdout
    opt = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=5).stdout
    return device_from_sysctl(out, opt)


def device_from_sysctl(values_text: str, optional_text: str) -> Device:
    v = parse_sysctl(values_text)
    opt = parse_sysctl(optional_text)
    features = tuple(sorted({name for key, name in MAC_FEATURES.items() if opt.get(key) == "1"}))
    total = int(v["hw.memsize"]) if v.get("hw.memsize", "").isdigit() else None
    phys = int(v["hw.physicalcpu"]) if v.get("hw.physicalcpu", "").isdigit() else None
    logical = int(v["hw.logicalcpu"]) if v.get("hw.logicalcpu", "").isdigit() else None
    return Device(kind="cpu", name=v.get("machdep.cpu.brand_string", "Mac CPU"), memory_total=total,
                  dtypes=cpu_dtypes(features), features=features, physical_cores=phys, logical_cores=logical)  # fmt: skip
