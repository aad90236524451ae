"""The one Device description that flows through every layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

KINDS = ("cpu", "cuda", "npu", "mps")
GiB = 1 << 30


class DeviceNotFound(LookupError):
    """A device was asked for that is not here (or the spec is malformed)."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda" | "npu" | "mps"
    index: int = 0
    name: str = ""
    memory_total: int | None = None  # bytes
    memory_free: int | None = None  # bytes
    dtypes: tuple[str, ...] = ("float32",)
    features: tuple[str, ...] = ()  # CPU flags (avx2, avx512_bf16, amx_bf16, neon, ...); GPU: compute_capability=9.0
    physical_cores: int | None = None
    logical_cores: int | None = None
    is_phone: bool = False  # Android / Termux
    driver: str | None = None  # NVIDIA driver or Ascend npu-smi/CANN version

    def spec(self) -> str:
        """How a user names this device: "cpu", "cuda:0", "npu:3", "mps"."""
        return self.kind if self.kind in ("cpu", "mps") else f"{self.kind}:{self.index}"

    def label(self) -> str:
        """One human line: "cuda:0 NVIDIA H100 80GB HBM3 (79.1 GiB free of 79.6 GiB)"."""
        parts = [self.spec()]
        what = self.name or self.kind
        if self.kind == "cpu" and self.physical_cores:
            what += f", {self.physical_cores} cores"
        parts.append(f"({what})" if self.kind == "cpu" else what)
        if self.memory_total:
            mem = f"{self.memory_total / GiB:.1f} GiB"
            if self.memory_free is not None:
                mem = f"{self.memory_free / GiB:.1f} GiB free of {mem}"
            parts.append(f"[{mem}]" if self.kind == "cpu" else f"({mem})")
        return " ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtypes"] = list(self.dtypes)
        d["features"] = list(self.features)
        d["spec"] = self.spec()
        return d


@dataclass
class DeviceReport:
    devices: list[Device]  # the cpu first, then cuda, npu, mps
    notes: dict[str, str] = field(default_factory=dict)  # kind -> why none was found

    def to_dict(self) -> dict:
        return {"devices": [d.to_dict() for d in self.devices], "notes": dict(self.notes)}

    def best(self) -> Device:
        """The first accelerator, else the CPU."""
        for d in self.devices:
            if d.kind != "cpu":
                return d
        return self.devices[0]

    def describe(self) -> str:
        found = "; ".join(d.label() for d in self.devices)
        return found or "nothing"
