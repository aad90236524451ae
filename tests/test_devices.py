"""The device layer: parsers on recorded real outputs (tests/fixtures/devices/SOURCES.md says where
each came from), probes with tools missing, failing or printing garbage, torch/torch_npu paths
through stand-in modules, detect() on this real machine, and errors that name what was detected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
from hanlin import devices
from hanlin.devices import (
    Device,
    DeviceNotFound,
    DeviceReport,
    apple,
    ascend,
    cpu,
    device_from_cpuinfo,
    device_from_sysctl,
    lookup,
    nvidia,
    parse_cpuinfo,
    parse_meminfo,
    parse_npu_smi_info,
    parse_nvidia_driver_version,
    parse_nvidia_smi_csv,
    tools,
)
from hanlin.devices.device import keep_visible

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "devices")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def fixture(name: str) -> str:
    with open(os.path.join(FIX, name), encoding="utf-8") as f:
        return f.read()


def fake_tool(tmp_path, monkeypatch, name: str, script: str) -> None:
    """Put an executable `name` running `script` (sh) first on PATH, before the system's own tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"]))


@pytest.fixture
def no_vendor_driver(monkeypatch):
    """Make the probes see no driver and no vendor Python packages, whatever machine runs the tests."""
    monkeypatch.setattr(nvidia, "nvidia_driver_present", lambda exists=None: False)
    monkeypatch.setattr(ascend, "ascend_driver_present", lambda isdir=None, which=None: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)


# ---- CPU: /proc/cpuinfo, /proc/meminfo ---------------------------------------------------------


def test_x86_cpuinfo_and_meminfo_of_this_machine():
    info = parse_cpuinfo(fixture("cpuinfo_x86_amd_epyc.txt"))
    assert (info.arch, info.name, info.physical_cores, info.logical_cores) == ("x86", "AMD EPYC", 2, 2)
    assert info.features == ("avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "f16c", "fma")
    assert parse_meminfo(fixture("meminfo_x86_amd_epyc.txt")) == (24684084 * KiB, 24405208 * KiB)
    dev = device_from_cpuinfo(fixture("cpuinfo_x86_amd_epyc.txt"), fixture("meminfo_x86_amd_epyc.txt"))
    assert dev.dtypes == ("float32", "bfloat16")  # avx512_bf16, no avx512_fp16
    assert dev.memory_total == 24684084 * KiB and dev.memory_free == 24405208 * KiB
    assert dev.spec() == "cpu" and not dev.is_phone
    assert dev.label() == "cpu (AMD EPYC, 2 cores) [23.3 GiB free of 23.5 GiB]"


def test_x86_granite_rapids_has_amx_and_fp16():
    info = parse_cpuinfo(fixture("cpuinfo_x86_intel_xeon6972p.txt"))
    assert info.name == "Intel(R) Xeon(R) 6972P"
    assert info.features == (
        "amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_fp16",
        "avx512_vnni", "avx512f", "avx_vnni", "f16c", "fma",
    )  # fmt: skip
    # the recorded file keeps one processor block of the 96, and cores are counted from blocks
    assert (info.physical_cores, info.logical_cores) == (1, 1)
    assert device_from_cpuinfo(fixture("cpuinfo_x86_intel_xeon6972p.txt"), None).dtypes == ("float32", "bfloat16", "float16")


def test_hyperthreads_are_not_counted_as_physical_cores():
    # Constructed (not recorded): the topology fields of a 2-core/4-thread Core i3-530 as posted in
    # peter-lawrey/Java-Thread-Affinity#10 (core ids 0 and 2, two threads each), other lines dropped.
    block = "processor\t: {p}\nmodel name\t: Intel(R) Core(TM) i3 CPU 530 @ 2.93GHz\nphysical id\t: 0\nsiblings\t: 4\ncore id\t\t: {c}\ncpu cores\t: 2\nflags\t\t: fpu sse sse2 ht\n"
    text = "\n".join(block.format(p=p, c=c) for p, c in enumerate([0, 0, 2, 2]))
    info = parse_cpuinfo(text)
    assert (info.physical_cores, info.logical_cores, info.features) == (2, 4, ())


def test_android_phone_pixel_6a():
    info = parse_cpuinfo(fixture("cpuinfo_arm_pixel6a_tensor_g1.txt"))
    assert (info.arch, info.name, info.physical_cores, info.logical_cores) == ("arm", "ARM Cortex-A55", 4, 4)
    assert info.features == ("asimdhp", "dotprod", "fp16", "neon")
    dev = device_from_cpuinfo(fixture("cpuinfo_arm_pixel6a_tensor_g1.txt"), None, phone=True)
    assert dev.dtypes == ("float32", "float16") and dev.is_phone and dev.memory_total is None
    assert dev.label() == "cpu (ARM Cortex-A55, 4 cores, Android)"


def test_arm_with_sve2_bf16_i8mm_exynos_1680():
    info = parse_cpuinfo(fixture("cpuinfo_arm_exynos1680.txt"))
    assert info.name == "ARM Cortex-A520" and info.logical_cores == 2
    assert info.features == ("asimdhp", "bf16", "dotprod", "fp16", "i8mm", "neon", "sve", "sve2")
    assert device_from_cpuinfo(fixture("cpuinfo_arm_exynos1680.txt"), None).dtypes == ("float32", "bfloat16", "float16")


def test_raspberry_pi_is_named_by_its_model_line_not_bcm2835():
    info = parse_cpuinfo(fixture("cpuinfo_arm_rpi3b.txt"))
    assert info.name == "Raspberry Pi 3 Model B Rev 1.2"  # its "Hardware" line says BCM2835
    assert (info.physical_cores, info.features) == (4, ("neon",))
    assert device_from_cpuinfo(fixture("cpuinfo_arm_rpi3b.txt"), None).dtypes == ("float32",)


def test_32_bit_arm_reports_neon_and_no_fp16_arithmetic():
    info = parse_cpuinfo(fixture("cpuinfo_armv7_rpi_cm4.txt"))
    assert info.name == "Raspberry Pi Compute Module 4 Rev 1.0"
    assert info.features == ("neon",)  # "half" is fp16 load/store, not arithmetic
    assert info.logical_cores == 4


def test_arm_server_name_is_built_from_implementer_and_part():
    info = parse_cpuinfo(fixture("cpuinfo_arm_ampere1a.txt"))
    assert info.name == "Ampere1A"  # implementer 0xc0, part 0xac4, no "model name" line
    assert info.features == ("asimdhp", "bf16", "dotprod", "fp16", "i8mm", "neon")


def test_old_android_kernel_lists_all_processors_in_one_block():
    info = parse_cpuinfo(fixture("cpuinfo_arm_android_msm8952_oldkernel.txt"))
    assert (info.name, info.logical_cores, info.features) == ("Qualcomm Technologies, Inc MSM8952", 8, ("neon",))


def test_meminfo_without_memavailable_uses_memfree():
    assert parse_meminfo("MemTotal:  1000 kB\nMemFree:  250 kB\n") == (1000 * KiB, 250 * KiB)
    assert parse_meminfo("nothing useful") == (None, None)


def test_android_detection_is_injectable():
    assert cpu.is_android({"TERMUX_VERSION": "0.118"}, exists=lambda p: False)
    assert cpu.is_android({"ANDROID_DATA": "/data"}, exists=lambda p: False)
    assert cpu.is_android({}, exists=lambda p: p == "/system/build.prop")
    assert not cpu.is_android({"HOME": "/root"}, exists=lambda p: False)


# ---- CPU: macOS sysctl -------------------------------------------------------------------------


def test_macos_m4_max_from_sysctl_hw_machdep():
    dev = device_from_sysctl(fixture("sysctl_macos_m4max.txt"))
    assert (dev.name, dev.memory_total, dev.physical_cores, dev.logical_cores) == ("Apple M4 Max", 64 * GiB, 16, 16)
    assert dev.features == ("asimdhp", "bf16", "dotprod", "fp16", "i8mm", "neon")
    assert dev.dtypes == ("float32", "bfloat16", "float16")


def test_macos_11_m1_keys_without_feat_names():
    dev = device_from_sysctl(fixture("sysctl_macos_m1_hw_optional.txt"))
    assert dev.features == ("asimdhp", "fp16", "neon") and dev.dtypes == ("float32", "float16")


def test_probe_cpu_on_macos_uses_one_sysctl_call(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "run_tool", lambda cmd, timeout=5.0: (calls.append(cmd), (fixture("sysctl_macos_m4max.txt"), None))[1])
    found, why = cpu.probe_cpu("Darwin")
    assert why is None and calls == [["sysctl", "hw", "machdep"]]
    assert found[0].name == "Apple M4 Max"


def test_probe_cpu_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(cpu, "read_text", lambda path: None)
    found, why = cpu.probe_cpu("Linux")
    assert why == "/proc/cpuinfo is not readable here"
    assert len(found) == 1 and found[0].kind == "cpu" and found[0].logical_cores == os.cpu_count()
    monkeypatch.setattr(cpu, "run_tool", lambda cmd, timeout=5.0: (None, "sysctl not on PATH"))
    found, why = cpu.probe_cpu("Darwin")
    assert why == "sysctl gave nothing: sysctl not on PATH" and found[0].kind == "cpu"


# ---- NVIDIA ------------------------------------------------------------------------------------


def test_nvidia_smi_csv_with_header_and_units():
    devs = parse_nvidia_smi_csv(fixture("nvidia_smi_a800x4.csv"))
    assert [d.spec() for d in devs] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert {d.name for d in devs} == {"NVIDIA A800-SXM4-80GB"}
    assert (devs[0].memory_total, devs[0].memory_free) == (81920 * MiB, 81176 * MiB)
    assert devs[0].features == () and devs[0].dtypes == ("float32", "float16")  # no compute_cap asked: bf16 unknown
    assert devs[0].label() == "cuda:0 NVIDIA A800-SXM4-80GB (79.3 GiB free of 80.0 GiB)"


def test_nvidia_smi_csv_columns_found_by_header_in_any_order():
    titan, ada = parse_nvidia_smi_csv(fixture("nvidia_smi_titanv_rtx5880_reordered.csv"))
    assert (titan.index, titan.name, titan.driver) == (0, "NVIDIA TITAN V", "570.86.15")
    assert titan.features == ("compute_capability=7.0",) and titan.dtypes == ("float32", "float16")
    assert (ada.index, ada.name) == (1, "NVIDIA RTX 5880 Ada Generation")
    assert ada.features == ("compute_capability=8.9",) and ada.dtypes == ("float32", "bfloat16", "float16")
    assert titan.memory_total is None  # not asked for


def test_nvidia_smi_noheader_nounits_in_hanlins_query_order():
    # Reconstructed in hanlin's column order from recorded values: the A800 rows above, the A800's
    # driver 535.86.10 from dexbotic#41's nvidia-smi banner, compute capability 8.0 (GA100).
    rows = [line.split(", ") for line in fixture("nvidia_smi_a800x4.csv").splitlines()[1:]]
    text = "\n".join(f"{i}, {n}, {t.split()[0]}, {f.split()[0]}, 8.0, 535.86.10" for i, (n, t, f) in enumerate(rows))
    devs = parse_nvidia_smi_csv(text)
    assert [d.index for d in devs] == [0, 1, 2, 3] and devs[3].memory_free == 81176 * MiB
    assert devs[0].features == ("compute_capability=8.0",) and devs[0].dtypes == ("float32", "bfloat16", "float16")
    assert devs[0].driver == "535.86.10"


def test_nvidia_unified_memory_na_and_best_skips_it():
    (gb10,) = parse_nvidia_smi_csv(fixture("nvidia_smi_gb10_na.csv"))
    assert (gb10.name, gb10.memory_total, gb10.memory_free) == ("NVIDIA GPU", None, None)
    cpu_dev = Device(kind="cpu", name="Cortex-X925")
    assert DeviceReport([cpu_dev, gb10]).best() is cpu_dev  # auto needs memory it can size a model to


def test_nvidia_smi_garbage_is_not_a_gpu():
    assert parse_nvidia_smi_csv("") == []
    assert parse_nvidia_smi_csv("No devices were found") == []
    assert parse_nvidia_smi_csv("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") == []
    assert parse_nvidia_smi_csv("x, NVIDIA H100, 1, 1, 9.0, 550") == []  # index is not a number
    assert parse_nvidia_smi_csv("0, NVIDIA H100") == []  # too few columns


def test_nvidia_driver_version_from_proc():
    assert parse_nvidia_driver_version(fixture("nvidia_driver_version_proprietary.txt")) == "580.173.02"
    assert parse_nvidia_driver_version(fixture("nvidia_driver_version_open.txt")) == "565.57.01"
    assert parse_nvidia_driver_version("garbage") is None


def test_cuda_visible_devices_renumbers_like_the_runtime():
    devs = parse_nvidia_smi_csv(fixture("nvidia_smi_titanv_rtx5880_reordered.csv"))
    visible, why = keep_visible(devs, "1", "CUDA_VISIBLE_DEVICES")
    assert why is None and [(d.index, d.name) for d in visible] == [(0, "NVIDIA RTX 5880 Ada Generation")]
    assert [d.name for d in keep_visible(devs, "1,0", "X")[0]] == ["NVIDIA RTX 5880 Ada Generation", "NVIDIA TITAN V"]
    assert [d.index for d in keep_visible(devs, "0,7,1", "X")[0]] == [0]  # CUDA stops at an invalid index
    assert keep_visible(devs, "GPU-8f3c2a", "X") == (devs, None)  # UUIDs: cannot map, keep all
    assert keep_visible(devs, None, "X") == (devs, None)
    hidden, why = keep_visible(devs, "", "CUDA_VISIBLE_DEVICES")
    assert hidden == [] and why == "CUDA_VISIBLE_DEVICES is set to an empty value, which hides all 2 devices"


def test_probe_nvidia_reads_nvidia_smi_and_applies_visibility(tmp_path, monkeypatch, no_vendor_driver):
    fake_tool(tmp_path, monkeypatch, "nvidia-smi", "echo '0, NVIDIA A100-SXM4-80GB, 81920, 80000, 8.0, 550.54.15'\necho '1, NVIDIA A100-SXM4-80GB, 81920, 1000, 8.0, 550.54.15'")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    found, why = nvidia.probe_nvidia()
    assert why is None and [(d.spec(), d.memory_free) for d in found] == [("cuda:0", 1000 * MiB)]


def test_probe_nvidia_without_driver_never_imports_torch(monkeypatch, no_vendor_driver):
    def must_not_run():
        raise AssertionError("torch probed without a driver")

    monkeypatch.setattr(nvidia, "probe_torch_cuda", must_not_run)
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    found, why = nvidia.probe_nvidia()
    assert found == [] and why == "no NVIDIA driver (/proc/driver/nvidia missing) and nvidia-smi not on PATH"


def test_probe_nvidia_failing_or_garbage_tool_gives_a_reason(tmp_path, monkeypatch, no_vendor_driver):
    fake_tool(tmp_path, monkeypatch, "nvidia-smi", "echo 'Failed to initialize NVML: Driver/library version mismatch' >&2\nexit 18")
    found, why = nvidia.probe_nvidia()
    assert found == [] and why.endswith("nvidia-smi failed (exit 18): Failed to initialize NVML: Driver/library version mismatch")
    fake_tool(tmp_path, monkeypatch, "nvidia-smi", "echo 'No devices were found'")
    assert nvidia.probe_nvidia() == ([], "nvidia-smi listed no GPU (No devices were found)")


def fake_torch_cuda(available: bool = True) -> types.ModuleType:
    """A stand-in for torch with the CUDA calls the probe makes, for machines without a GPU."""
    torch = types.ModuleType("torch")
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: available,
        device_count=lambda: 1,
        get_device_properties=lambda i: props,
        mem_get_info=lambda i: (84_935_000_000, 85_520_809_984),  # H100 total as torch reports it
    )
    return torch


def test_probe_nvidia_uses_torch_when_a_driver_is_loaded(monkeypatch):
    monkeypatch.setattr(nvidia, "nvidia_driver_present", lambda exists=None: True)
    monkeypatch.setitem(sys.modules, "torch", fake_torch_cuda())
    monkeypatch.setattr(nvidia, "read_text", lambda path: fixture("nvidia_driver_version_proprietary.txt"))
    found, why = nvidia.probe_nvidia()
    assert why is None and len(found) == 1
    h100 = found[0]
    assert (h100.memory_total, h100.memory_free, h100.driver) == (85_520_809_984, 84_935_000_000, "580.173.02")
    assert h100.features == ("compute_capability=9.0",) and "bfloat16" in h100.dtypes
    assert h100.label() == "cuda:0 NVIDIA H100 80GB HBM3 (79.1 GiB free of 79.6 GiB)"


def test_probe_nvidia_keeps_torchs_reason_when_nvidia_smi_also_fails(monkeypatch):
    monkeypatch.setattr(nvidia, "nvidia_driver_present", lambda exists=None: True)
    monkeypatch.setitem(sys.modules, "torch", fake_torch_cuda(available=False))
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    assert nvidia.probe_nvidia() == ([], "torch.cuda.is_available() is False; nvidia-smi not on PATH")


# ---- Ascend ------------------------------------------------------------------------------------


def test_npu_smi_910b3_eight_chips():
    devs = parse_npu_smi_info(fixture("npu_smi_910b3_8x.txt"))
    assert [d.spec() for d in devs] == [f"npu:{i}" for i in range(8)]
    assert {d.name for d in devs} == {"Ascend910B3"} and {d.memory_total for d in devs} == {65536 * MiB}
    used = [3318, 3314, 3314, 3314, 3314, 3314, 3314, 3315]
    assert [d.memory_free for d in devs] == [(65536 - u) * MiB for u in used]
    assert devs[0].driver == "24.1.rc1.b030" and devs[0].dtypes == ("float32", "bfloat16", "float16")
    assert devs[7].label() == "npu:7 Ascend910B3 (60.8 GiB free of 64.0 GiB)"


def test_npu_smi_910prob_first_generation_uses_hbm_and_has_no_bf16():
    devs = parse_npu_smi_info(fixture("npu_smi_910prob_8x.txt"))
    assert len(devs) == 8  # the "No running processes found in NPU n" rows are not chips
    assert {d.name for d in devs} == {"Ascend910ProB"} and {d.memory_total for d in devs} == {32768 * MiB}
    assert [d.memory_free // MiB for d in devs] == [32768 - u for u in (18, 8, 5, 4, 10, 14, 3, 2)]
    assert devs[0].dtypes == ("float32", "float16") and devs[0].driver == "24.1.0"


def test_npu_smi_910b4_masked_bus_id_and_tight_spacing():
    b4_1 = parse_npu_smi_info(fixture("npu_smi_910b4-1.txt"))  # bus ids masked as 0000:xx:00.0
    assert [(d.name, d.memory_free // MiB, d.driver) for d in b4_1] == [("Ascend910B4-1", 65536 - 3197, "25.2.0")] * 2
    b4 = parse_npu_smi_info(fixture("npu_smi_910b4_32g.txt"))  # "26838/ 32768"
    assert [(d.memory_total // MiB, d.memory_free // MiB) for d in b4] == [(32768, 32768 - 26838), (32768, 32768 - 29356)]


def test_npu_smi_910b3_excerpt_without_version_line():
    devs = parse_npu_smi_info(fixture("npu_smi_910b3.txt"))
    assert [d.memory_free // MiB for d in devs] == [65536 - 3379, 65536 - 3385, 65536 - 3380]
    assert {d.driver for d in devs} == {None}


def test_npu_smi_a3_two_chips_per_npu_and_process_table():
    devs = parse_npu_smi_info(fixture("npu_smi_a3_ascend910.txt"))
    assert [(d.index, d.name, d.memory_free // MiB) for d in devs] == [
        (0, "Ascend910", 65536 - 3131), (1, "Ascend910", 65536 - 2886), (2, "Ascend910", 65536 - 3125)]  # fmt: skip
    assert devs[0].dtypes == ("float32", "bfloat16", "float16") and devs[0].driver == "25.2.1"
    (last,) = parse_npu_smi_info(fixture("npu_smi_a3_with_processes.txt"))
    assert last.memory_free == (65536 - 31877) * MiB


def test_npu_dtypes_by_soc_name():
    assert ascend.npu_dtypes("Ascend910B2C") == ("float32", "bfloat16", "float16")
    assert ascend.npu_dtypes("Ascend910_9391") == ("float32", "bfloat16", "float16")
    assert ascend.npu_dtypes("Ascend910B") == ("float32", "float16")  # a bare 910B is first generation
    assert ascend.npu_dtypes("Ascend910PremiumA") == ("float32", "float16")
    assert ascend.npu_dtypes("Ascend310P3") == ("float32", "float16")


def test_npu_smi_garbage_gives_nothing():
    assert parse_npu_smi_info("dcmi module initialize failed. ret is -8005") == []
    assert parse_npu_smi_info("") == []


def test_probe_ascend_reads_npu_smi_and_applies_visibility(tmp_path, monkeypatch, no_vendor_driver):
    fake_tool(tmp_path, monkeypatch, "npu-smi", f"cat '{os.path.join(FIX, 'npu_smi_910b3_8x.txt')}'")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "6,7")
    found, why = ascend.probe_ascend()
    assert why is None and [(d.spec(), d.memory_free // MiB) for d in found] == [("npu:0", 65536 - 3314), ("npu:1", 65536 - 3315)]


def test_probe_ascend_missing_failing_or_garbage_tool(tmp_path, monkeypatch, no_vendor_driver):
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    assert ascend.probe_ascend() == ([], "no Ascend driver (/usr/local/Ascend missing) and npu-smi not on PATH")
    monkeypatch.undo()
    monkeypatch.setattr(ascend, "ascend_driver_present", lambda isdir=None, which=None: False)
    fake_tool(tmp_path, monkeypatch, "npu-smi", "echo 'dcmi module initialize failed. ret is -8005'\nexit 1")
    found, why = ascend.probe_ascend()
    assert found == [] and why.endswith("npu-smi failed (exit 1): dcmi module initialize failed. ret is -8005")
    fake_tool(tmp_path, monkeypatch, "npu-smi", "echo 'garbage out'")
    assert ascend.probe_ascend() == ([], "npu-smi info listed no NPU (garbage out)")


def test_torch_npu_import_that_exits_is_a_reason(tmp_path, monkeypatch):
    # Without CANN, `import torch_npu` can end in SystemExit; the probe must survive it.
    (tmp_path / "torch_npu.py").write_text("raise SystemExit('libascendcl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    found, why = ascend.probe_torch_npu()
    assert found == [] and why == "torch_npu could not query the NPUs: SystemExit: libascendcl.so: cannot open shared object file"


def test_torch_npu_path_when_it_works(monkeypatch):
    torch = types.ModuleType("torch")
    torch.npu = types.SimpleNamespace(device_count=lambda: 2, get_device_name=lambda i: "Ascend910B3",
                                      mem_get_info=lambda i: ((60 + i) * GiB, 64 * GiB))  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(ascend, "ascend_driver_present", lambda isdir=None, which=None: True)
    monkeypatch.setattr(ascend, "_torch_npu_installed", lambda: True)
    found, why = ascend.probe_ascend()
    assert why is None and [(d.spec(), d.memory_free) for d in found] == [("npu:0", 60 * GiB), ("npu:1", 61 * GiB)]
    assert found[0].dtypes == ("float32", "bfloat16", "float16")


# ---- Apple MPS ---------------------------------------------------------------------------------


def test_mps_only_on_macos_and_only_through_torch(monkeypatch):
    assert apple.probe_mps("Linux") == ([], "not macOS")
    monkeypatch.setattr(apple, "_torch_installed", lambda: False)
    assert apple.probe_mps("Darwin") == ([], "torch not installed (MPS is reached through torch)")


def test_mps_device_with_unified_memory(monkeypatch):
    def zeros(*args, **kwargs):
        raise TypeError("BFloat16 is not supported on MPS")  # what older macOS/torch say

    torch = types.ModuleType("torch")
    torch.bfloat16 = "bfloat16"
    torch.zeros = zeros
    torch.backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(apple, "_torch_installed", lambda: True)
    monkeypatch.setattr(apple, "run_tool", lambda cmd, timeout=5.0: ("17179869184\nApple M2\n", None))
    found, why = apple.probe_mps("Darwin")
    assert why is None and found == [Device(kind="mps", name="Apple M2 GPU", memory_total=16 * GiB, dtypes=("float32", "float16"))]
    assert found[0].spec() == "mps"
    torch.backends.mps.is_available = lambda: False
    found, why = apple.probe_mps("Darwin")
    assert found == [] and why.startswith("torch.backends.mps.is_available() is False")


# ---- running tools -----------------------------------------------------------------------------


def test_run_tool_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    assert tools.run_tool(["nvidia-smi"]) == (None, "nvidia-smi not on PATH")
    monkeypatch.undo()
    fake_tool(tmp_path, monkeypatch, "slow-smi", "sleep 5")
    assert tools.run_tool(["slow-smi"], timeout=0.2) == (None, "slow-smi did not answer within 0.2 s")
    fake_tool(tmp_path, monkeypatch, "quiet-smi", "exit 3")
    assert tools.run_tool(["quiet-smi"]) == (None, "quiet-smi failed (exit 3): no output")
    fake_tool(tmp_path, monkeypatch, "ok-smi", "printf 'x\\377y\\n'")  # not UTF-8: replaced, not raised
    out, why = tools.run_tool(["ok-smi"])
    assert why is None and out == "x\ufffdy\n"


# ---- Device, DeviceReport ----------------------------------------------------------------------


def test_device_spec_label_validation_and_json():
    assert Device(kind="npu", index=3).spec() == "npu:3" and Device(kind="mps").spec() == "mps"
    with pytest.raises(ValueError, match="'gpu' is not one of cpu, cuda, npu, mps"):
        Device(kind="gpu")
    dev = Device(kind="cuda", name="NVIDIA L4", dtypes=["float32", "float16"], features=["compute_capability=8.9"])
    assert dev.dtypes == ("float32", "float16") and hash(dev) == hash(dev.__class__(**vars(dev)))
    assert dev.label() == "cuda:0 NVIDIA L4"
    assert json.loads(json.dumps(dev.to_dict()))["spec"] == "cuda:0"


# ---- detect and get_device ---------------------------------------------------------------------


def test_detect_on_this_machine():
    report = devices.detect(refresh=True)
    cpu_dev = report.devices[0]
    assert cpu_dev.kind == "cpu" and cpu_dev.memory_total > 0 and cpu_dev.physical_cores >= 1
    assert cpu_dev.name and cpu_dev.features == parse_cpuinfo(tools.read_text("/proc/cpuinfo")).features
    for kind in ("cuda", "npu", "mps"):
        if not any(d.kind == kind for d in report.devices):
            assert len(report.notes[kind]) > 5  # a reason in words
    assert devices.detect() is report and devices.detect(refresh=True) is not report
    data = json.loads(json.dumps(report.to_dict()))
    assert data["devices"][0]["spec"] == "cpu" and data["best"] == report.best().spec()


def test_a_probe_that_raises_becomes_a_note(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setitem(lookup.PROBES, "cuda", broken)
    report = devices.detect(refresh=True)
    assert report.notes["cuda"] == "cuda probe failed: RuntimeError: boom" and report.devices[0].kind == "cpu"
    monkeypatch.undo()
    devices.detect(refresh=True)


@pytest.fixture
def epyc_only(monkeypatch):
    cpu_dev = Device(kind="cpu", name="AMD EPYC", physical_cores=2)
    notes = {"cuda": "torch not installed and nvidia-smi not found", "npu": "npu-smi not on PATH", "mps": "not macOS"}
    monkeypatch.setattr(lookup, "_cache", DeviceReport([cpu_dev], notes))
    return cpu_dev


def test_get_device_names_what_was_detected(epyc_only):
    assert devices.get_device("cpu") is epyc_only and devices.get_device(" AUTO ") is epyc_only
    with pytest.raises(DeviceNotFound) as e:
        devices.get_device("cuda")
    assert str(e.value) == "no cuda device here: torch not installed and nvidia-smi not found; detected: cpu (AMD EPYC, 2 cores)"
    with pytest.raises(DeviceNotFound, match=r"^no npu device here: npu-smi not on PATH; detected: cpu \(AMD EPYC"):
        devices.get_device("npu:0")
    with pytest.raises(DeviceNotFound, match=r"^no mps device here: not macOS"):
        devices.get_device("mps")


def test_get_device_malformed_specs_list_valid_forms(epyc_only):
    with pytest.raises(DeviceNotFound) as e:
        devices.get_device("gpu")
    assert str(e.value).startswith("'gpu' is not a device name (did you mean 'cuda'?); use auto, cpu, cuda, cuda:N, npu, npu:N or mps")
    assert str(e.value).endswith("detected: cpu (AMD EPYC, 2 cores)")
    for bad in ("cuda:x", "cuda:-1", "npu0", ""):
        with pytest.raises(DeviceNotFound, match="is not a device name"):
            devices.get_device(bad)


def test_get_device_indexes_and_auto(monkeypatch, epyc_only):
    gpus = parse_nvidia_smi_csv(fixture("nvidia_smi_titanv_rtx5880_reordered.csv"))  # no memory column
    monkeypatch.setattr(lookup, "_cache", DeviceReport([epyc_only, *gpus], {}))
    assert devices.get_device("cuda") is gpus[0] and devices.get_device("cuda:1") is gpus[1]
    assert devices.get_device("auto") is epyc_only  # GPUs of unknown memory: auto stays on the CPU
    with pytest.raises(DeviceNotFound, match=r"^cuda:3 does not exist; this machine has cuda:0, cuda:1$"):
        devices.get_device("cuda:3")
    npus = parse_npu_smi_info(fixture("npu_smi_910b4-1.txt"))
    monkeypatch.setattr(lookup, "_cache", DeviceReport([epyc_only, *npus], {}))
    assert devices.get_device("auto") is npus[0] and devices.get_device("npu:1") is npus[1]
    assert devices.get_device(npus[1]) is npus[1]  # a Device passes through


def test_real_machine_cuda_request_names_this_cpu():
    report = devices.detect(refresh=True)
    if any(d.kind == "cuda" for d in report.devices):
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(DeviceNotFound) as e:
        devices.get_device("cuda")
    assert str(e.value).startswith(f"no cuda device here: {report.notes['cuda']}; detected: cpu ({report.devices[0].name}")


def test_importing_devices_stays_light():
    code = (
        "import sys, hanlin.devices as d; d.detect(); d.get_device('cpu'); "
        "print(sorted(m for m in ('torch', 'torch_npu', 'numpy', 'hanlin.backends', 'hanlin.apps') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
