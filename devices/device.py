"""The one Device description that flows through every layer, and the report that holds them.

Backends, the SDK and the apps all receive a `Device` from here instead of probing hardware on
their own, so "what is this machine" is answered once and the same way everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

KINDS = ("cpu", "cuda", "npu", "mps")
GiB = 1 << 30


class DeviceNotFound(LookupError):
    """A device was asked for that is not here, or the name asked for is not a device name.

    The message always says what was asked for and what this machine does have, so the user can
    fix the request without running a second command to find out.
    """


@dataclass(frozen=True)
class Device:
    """One compute device: the CPU, a CUDA GPU, an Ascend NPU chip or the Apple GPU (MPS).

    Frozen so it can be shared, cached and used as a dict key by every layer. Memory is in bytes;
    `None` means "not known", which is different from 0.
    """

    kind: str  # "cpu" | "cuda" | "npu" | "mps"
    index: int = 0
    name: str = ""
    memory_total: int | None = None  # bytes
    memory_free: int | None = None  # bytes
    dtypes: tuple[str, ...] = ("float32",)  # e.g. ("float32", "bfloat16", "float16")
    features: tuple[str, ...] = ()  # CPU: avx2, avx512_bf16, amx_bf16, neon, dotprod, ...; GPU: compute_capability=9.0
    physical_cores: int | None = None
    logical_cores: int | None = None
    is_phone: bool = False  # Android / Termux
    driver: str | None = None  # NVIDIA driver or Ascend npu-smi version, when known

    def __post_init__(self) -> None:
        # Callers build Devices too (tests, user code): a typo in `kind` must fail here, not as a
        # confusing "no engine runs on gpu" three layers later.
        if self.kind not in KINDS:
            raise ValueError(f"Device kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.index < 0:
            raise ValueError(f"Device index must be >= 0, got {self.index}")
        # Lists are accepted for convenience but stored as tuples so the Device stays hashable.
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        object.__setattr__(self, "features", tuple(self.features))

    def spec(self) -> str:
        """How a user names this device: "cpu", "cuda:0", "npu:3", "mps" (there is one CPU and one MPS)."""
        return self.kind if self.kind in ("cpu", "mps") else f"{self.kind}:{self.index}"

    def label(self) -> str:
        """One human line, e.g. "cuda:0 NVIDIA H100 80GB HBM3 (79.1 GiB free of 79.6 GiB)"."""
        memory = _memory_text(self.memory_total, self.memory_free)
        if self.kind == "cpu":
            what = [self.name or "CPU"]
            if self.physical_cores:
                what.append(f"{self.physical_cores} cores")
            if self.is_phone:
                what.append("Android")
            text = f"cpu ({', '.join(what)})"
            return f"{text} [{memory}]" if memory else text
        text = f"{self.spec()} {self.name or self.kind}"
        return f"{text} ({memory})" if memory else text

    def to_dict(self) -> dict:
        """JSON-able form (memory in bytes), with the spec added for convenience."""
        data = asdict(self)
        data["dtypes"] = list(self.dtypes)
        data["features"] = list(self.features)
        data["spec"] = self.spec()
        return data


def _memory_text(total: int | None, free: int | None) -> str:
    if not total:
        return ""
    if free is None:
        return f"{total / GiB:.1f} GiB"
    return f"{free / GiB:.1f} GiB free of {total / GiB:.1f} GiB"


@dataclass
class DeviceReport:
    """Every device found on this machine, and for each kind not found, the reason in words."""

    devices: list[Device]  # the CPU first, then cuda, npu, mps
    notes: dict[str, str] = field(default_factory=dict)  # kind -> why none was found

    def best(self) -> Device:
        """The first accelerator whose memory is known (so a model can be sized to it), else the CPU."""
        for dev in self.devices:
            if dev.kind != "cpu" and dev.memory_total:
                return dev
        return self.cpu()

    def cpu(self) -> Device:
        """The CPU entry (always present: the CPU probe falls back to a minimal Device)."""
        for dev in self.devices:
            if dev.kind == "cpu":
                return dev
        return Device(kind="cpu", name="CPU")

    def describe(self) -> str:
        """All devices on one line, for error messages: "cpu (AMD EPYC, 2 cores) [...]; cuda:0 ..."."""
        return "; ".join(dev.label() for dev in self.devices) or "nothing"

    def to_dict(self) -> dict:
        return {
            "devices": [dev.to_dict() for dev in self.devices],
            "notes": dict(self.notes),
            "best": self.best().spec(),
        }


def keep_visible(devices: list[Device], value: str | None, variable: str) -> tuple[list[Device], str | None]:
    """Apply CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES to devices listed by a vendor tool.

    nvidia-smi and npu-smi list every device on the machine, but the runtimes (torch, llama.cpp,
    torch_npu) only see the ones in the variable, renumbered from 0. Without this, "cuda:1" could
    name a GPU the engine cannot open. Follows CUDA's rule: integers in order, stopping at the first
    entry that is not one; an empty value hides everything. Entries we cannot map without UUIDs
    ("GPU-8f3c...", "MIG-...") leave the list as the tool gave it.
    """
    if value is None:
        return devices, None
    if not value.strip():
        return [], (f"{variable} is set to an empty value, which hides all {len(devices)} devices" if devices else None)
    wanted: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            if not wanted:  # a UUID or MIG name first: cannot map, keep the tool's view
                return devices, None
            break
        wanted.append(int(part))
    by_index = {dev.index: dev for dev in devices}
    visible: list[Device] = []
    for n, i in enumerate(wanted):
        if i not in by_index or i in wanted[:n]:
            break  # an index past the end, or a repeated one, ends CUDA's list
        visible.append(replace(by_index[i], index=n))
    if devices and not visible:
        return [], f"{variable}={value!r} hides all {len(devices)} devices ({', '.join(d.spec() for d in devices)})"
    return visible, None
