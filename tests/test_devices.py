"""The device layer: parsers on recorded real outputs (tests/fixtures/devices/SOURCES.md),
probes on this machine, and errors that name what was detected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hanlin import devices
from hanlin.devices import (
    Device,
    DeviceNotFound,
    accelerators,
    device_from_cpuinfo,
    device_from_sysctl,
    parse_cpuinfo,
    parse_meminfo,
    parse_npu_smi_info,
    parse_nvidia_smi_csv,
)
from hanlin.devices.cpu import is_android

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "devices")
MiB = 1 << 20


def fixture(name: str) -> str:
    with open(os.path.join(FIX, name), encoding="utf-8") as f:
        return f.read()


# ---- CPU ----------------------------------------------------------------------------------


def test_x86_cpuinfo_recorded_on_amd_epyc():
    info = parse_cpuinfo(fixture("cpuinfo_x86_amd_epyc.txt"))
    assert info["arch"] == "x86" and info["name"] == "AMD EPYC"
    assert info["physical_cores"] == 2 and info["logical_cores"] == 2
    assert {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni"} <= set(info["features"])
    assert "amx_bf16" not in info["features"] and "avx512_fp16" not in info["features"]
    dev = device_from_cpuinfo(fixture("cpuinfo_x86_amd_epyc.txt"), fixture("meminfo_x86_amd_epyc.txt"))
    total, avail = parse_meminfo(fixture("meminfo_x86_amd_epyc.txt"))
    assert dev.memory_total == total and total > 20 * (1 << 30) and 0 < avail <= total
    assert dev.dtypes == ("float32", "bfloat16")
    assert dev.spec() == "cpu" and not dev.is_phone


def test_hyperthreads_are_not_physical_cores():
    block = "processor\t: {p}\nmodel name\t: Intel(R) Xeon(R)\nphysical id\t: 0\ncore id\t\t: {c}\nflags\t\t: fpu avx avx2 amx_tile amx_bf16 amx_int8 avx512f avx512_fp16\n"
    text = "\n".join(block.format(p=p, c=p % 4) for p in range(8))
    info = parse_cpuinfo(text)
    assert info["logical_cores"] == 8 and info["physical_cores"] == 4
    assert {"amx_bf16", "amx_tile", "amx_int8", "avx512_fp16"} <= set(info["features"])
    assert device_from_cpuinfo(text, None).dtypes == ("float32", "bfloat16", "float16")


def test_arm_phone_cpuinfo_pixel_6a():
    info = parse_cpuinfo(fixture("cpuinfo_arm_pixel6a_tensor_g1.txt"))
    assert info["arch"] == "arm"
    assert info["name"] == "ARM Cortex-A55"
    assert info["logical_cores"] == 4
    assert set(info["features"]) == {"neon", "fp16", "asimdhp", "dotprod"}
    dev = device_from_cpuinfo(fixture("cpuinfo_arm_pixel6a_tensor_g1.txt"), None, phone=True)
    assert dev.dtypes == ("float32", "float16") and dev.is_phone and dev.memory_total is None


def test_arm_cpuinfo_with_sve2_bf16_i8mm():
    info = parse_cpuinfo(fixture("cpuinfo_arm_exynos1680.txt"))
    assert info["name"] == "ARM Cortex-A520"
    assert {"neon", "sve", "sve2", "i8mm", "bf16", "dotprod", "fp16"} <= set(info["features"])
    assert device_from_cpuinfo(fixture("cpuinfo_arm_exynos1680.txt"), None).dtypes == ("float32", "bfloat16", "float16")


def test_android_detection():
    assert is_android({"TERMUX_VERSION": "0.118"}, exists=lambda p: False)
    assert is_android({"ANDROID_ROOT": "/system"}, exists=lambda p: False)
    assert is_android({}, exists=lambda p: p == "/system/build.prop")
    assert not is_android({}, exists=lambda p: False)


def test_macos_sysctl_parsing():
    values = "hw.memsize: 17179869184\nmachdep.cpu.brand_string: Apple M2\nhw.physicalcpu: 8\nhw.logicalcpu: 8\n"
    optional = "hw.optional.neon: 1\nhw.optional.arm.FEAT_BF16: 1\nhw.optional.arm.FEAT_I8MM: 1\nhw.optional.arm.FEAT_SME: 0\n"
    dev = device_from_sysctl(values, optional)
    assert dev.name == "Apple M2" and dev.memory_total == 16 << 30 and dev.physical_cores == 8
    assert dev.features == ("bf16", "i8mm", "neon") and "bfloat16" in dev.dtypes


# ---- NVIDIA -------------------------------------------------------------------------------


def test_nvidia_smi_csv_with_header_and_units():
    devs = parse_nvidia_smi_csv(fixture("nvidia_smi_a800x4.csv"))
    assert [d.spec() for d in devs] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert all(d.name == "NVIDIA A800-SXM4-80GB" for d in devs)
    assert devs[0].memory_total == 81920 * MiB and devs[0].memory_free == 81176 * MiB
    one = parse_nvidia_smi_csv(fixture("nvidia_smi_rtx4070.csv"))[0]
    assert one.name == "NVIDIA GeForce RTX 4070" and one.memory_free == 631 * MiB
    five = parse_nvidia_smi_csv(fixture("nvidia_smi_rtx5070ti.csv"))[0]
    assert five.memory_total == 16303 * MiB and five.memory_free == 14109 * MiB


def test_nvidia_smi_csv_noheader_nounits_in_our_query_order():
    # Derived from the recorded A800 output: our own query adds index, compute_cap and
    # driver_version, and asks for noheader,nounits.
    rows = [l.split(", ") for l in fixture("nvidia_smi_a800x4.csv").splitlines()[1:]]
    text = "\n".join(f"{i}, {n}, {t.split()[0]}, {f.split()[0]}, 8.0, 535.129.03" for i, (n, t, f) in enumerate(rows))
    devs = parse_nvidia_smi_csv(text)
    assert len(devs) == 4 and devs[3].index == 3
    assert devs[0].features == ("compute_capability=8.0",)
    assert devs[0].dtypes == ("float32", "float16", "bfloat16") and devs[0].driver == "535.129.03"
    old = parse_nvidia_smi_csv("0, Tesla V100-SXM2-16GB, 16384, 16000, 7.0, 470.57.02")[0]
    assert "bfloat16" not in old.dtypes  # Volta has no bf16


def test_nvidia_unified_memory_reports_na():
    dev = parse_nvidia_smi_csv("name, memory.total [MiB], memory.free [MiB]\nNVIDIA GB10, [N/A], [N/A]")[0]
    assert dev.name == "NVIDIA GB10" and dev.memory_total is None and dev.memory_free is None


# ---- Ascend -------------------------------------------------------------------------------


def test_npu_smi_910b4_1():
    devs = parse_npu_smi_info(fixture("npu_smi_910b4-1.txt"))
    assert [d.spec() for d in devs] == ["npu:0", "npu:1"]
    assert devs[0].name == "Ascend 910B4-1"
    assert devs[0].memory_total == 65536 * MiB and devs[0].memory_free == (65536 - 3197) * MiB
    assert devs[0].driver == "25.2.0" and "bfloat16" in devs[0].dtypes


def test_npu_smi_910b3_without_version_line():
    devs = parse_npu_smi_info(fixture("npu_smi_910b3.txt"))
    assert [d.name for d in devs] == ["Ascend 910B3"] * 3
    assert [d.memory_free // MiB for d in devs] == [65536 - 3379, 65536 - 3385, 65536 - 3380]
    assert devs[0].driver is None


def test_npu_smi_910b4_32g_tight_spacing():
    devs = parse_npu_smi_info(fixture("npu_smi_910b4_32g.txt"))
    assert [d.memory_total // MiB for d in devs] == [32768, 32768]
    assert [d.memory_free // MiB for d in devs] == [32768 - 26838, 32768 - 29356]
    assert devs[1].driver == "24.1.1"


def test_npu_smi_a3_two_chips_per_npu():
    devs = parse_npu_smi_info(fixture("npu_smi_a3_ascend910.txt"))
    assert len(devs) == 3 and [d.index for d in devs] == [0, 1, 2]
    assert all(d.name == "Ascend910" for d in devs)
    assert [d.memory_free // MiB for d in devs] == [65536 - 3131, 65536 - 2886, 65536 - 3125]
    assert "bfloat16" in devs[0].dtypes


def test_npu_smi_process_table_is_not_a_device():
    devs = parse_npu_smi_info(fixture("npu_smi_a3_with_processes.txt"))
    assert len(devs) == 1 and devs[0].memory_free == (65536 - 31877) * MiB


def test_npu_smi_garbage_gives_nothing():
    assert parse_npu_smi_info("dcmi module initialize failed. ret is -8005") == []
    assert parse_nvidia_smi_csv("") == []


# ---- probes and errors on this machine -----------------------------------------------------


def test_detect_on_this_machine_never_raises():
    report = devices.detect(refresh=True)
    cpu = report.devices[0]
    assert cpu.kind == "cpu" and cpu.memory_total and cpu.memory_total > 0 and cpu.physical_cores >= 1
    for kind in ("cuda", "npu", "mps"):
        if not any(d.kind == kind for d in report.devices):
            assert report.notes[kind]  # a reason, in words
    assert json.loads(json.dumps(report.to_dict()))["devices"][0]["spec"] == "cpu"


def test_get_device_errors_name_what_was_detected(monkeypatch):
    cpu = Device(kind="cpu", name="Test CPU", physical_cores=2)
    monkeypatch.setattr(devices, "_CACHE", devices.DeviceReport([cpu], {"cuda": "nvidia-smi not found on PATH", "npu": "npu-smi not found on PATH"}))
    assert devices.get_device("cpu") is cpu and devices.get_device("auto") is cpu
    with pytest.raises(DeviceNotFound, match=r"no cuda device here: nvidia-smi not found on PATH; detected: cpu \(Test CPU, 2 cores\)"):
        devices.get_device("cuda")
    with pytest.raises(DeviceNotFound, match="no npu device here"):
        devices.get_device("npu:0")
    with pytest.raises(DeviceNotFound, match="'gpu' is not a device name; use auto, cpu, cuda"):
        devices.get_device("gpu")
    with pytest.raises(DeviceNotFound, match="not a device name"):
        devices.get_device("cuda:x")
    gpu = Device(kind="cuda", index=0, name="H100")
    monkeypatch.setattr(devices, "_CACHE", devices.DeviceReport([cpu, gpu], {}))
    assert devices.get_device("auto") is gpu and devices.get_device("cuda:0") is gpu
    with pytest.raises(DeviceNotFound, match="cuda:3 does not exist; this machine has cuda:0"):
        devices.get_device("cuda:3")


def test_missing_tools_are_reasons(monkeypatch):
    monkeypatch.setattr(accelerators.shutil, "which", lambda name: None)
    monkeypatch.setattr(accelerators, "nvidia_driver_present", lambda exists=None: False)
    devs, why = accelerators.probe_nvidia()
    assert devs == [] and "nvidia-smi not found on PATH" in why
    devs, why = accelerators.probe_ascend()
    assert devs == [] and "npu-smi not found on PATH" in why
    assert accelerators.probe_mps("Linux") == ([], "not macOS")


def test_failing_or_garbage_tools_are_reasons(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.' >&2\nexit 9\n")
    (bin_dir / "npu-smi").write_text("#!/bin/sh\necho 'garbage out'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    devs, why = accelerators.probe_nvidia()
    assert devs == [] and "nvidia-smi failed (exit 9)" in why and "could not communicate" in why
    devs, why = accelerators.probe_ascend()
    assert devs == [] and why == "npu-smi lists no NPU"


def test_importing_devices_stays_light():
    code = "import sys, hanlin.devices as d; d.detect(); print(sorted(m for m in ('torch', 'torch_npu', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
