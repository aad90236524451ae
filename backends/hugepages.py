"""Back an engine's weights with 2 MiB pages (Linux transparent huge pages).

    with huge_pages() as hp:
        session = onnxruntime.InferenceSession(...)   # allocates the packed weights
    hp.collapsed_mib, hp.seconds, hp.reason

Decoding a small model streams every weight once a token, so the CPU walks tens of
thousands of 4 KiB pages a token and misses its TLB on most of them. With 2 MiB pages it
walks 512x fewer. Most Linux machines run transparent huge pages in "madvise" mode (this
one does): memory gets 2 MiB pages only where a program asks for them, and onnxruntime and
glibc's malloc do not ask (numpy does, for arrays of 4 MiB and more). The block above finds
the anonymous memory that appeared inside it (/proc/self/maps before and after), asks for
huge pages there (MADV_HUGEPAGE) and rebuilds what is already filled in with them now
(MADV_COLLAPSE, Linux 6.1+) instead of leaving it to khugepaged, which takes minutes.

Measured on the default model's onnx int4 export (tools/bench_decode.py runs the engine
both ways): see OnnxEngine.load. Regions under 16 MiB are left alone: they are thread stacks
(8 MiB each) and small heaps, where a 2 MiB page only adds resident memory.

Anywhere else (not Linux, THP set to "never", an old kernel) the block does nothing or only
advises, and `reason` says why; it never raises.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

PAGE = 2 << 20
MIN_REGION = 16 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
OFF = ("0", "false", "no", "off")  # HANLIN_HUGE_PAGES values that turn it off


@dataclass
class HugePages:
    advised_mib: int = 0  # new anonymous memory asked to be backed by 2 MiB pages
    collapsed_mib: int = 0  # how much more of the process's memory is on 2 MiB pages than before the block
    seconds: float = 0.0
    reason: str = ""  # why less than all was done; "" when all was

    def as_dict(self) -> dict:
        return {"huge_pages_mib": self.collapsed_mib, **({"huge_pages_note": self.reason} if self.reason else {})}


def unavailable() -> str:
    """Why huge pages cannot be asked for here, or ''."""
    if os.environ.get("HANLIN_HUGE_PAGES", "1").strip().lower() in OFF:
        return "turned off by HANLIN_HUGE_PAGES"
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are a Linux feature (this is {sys.platform})"
    try:
        with open(THP_MODE, encoding="ascii") as f:
            mode = f.read()
    except OSError:
        return f"{THP_MODE} is not readable: this kernel has no transparent huge pages"
    if "[never]" in mode:
        return "transparent huge pages are set to 'never' on this machine"
    return ""


def anonymous_regions(maps: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """[start, end) of this process's private writable anonymous mappings (the heap included)."""
    out = []
    with open(maps, encoding="ascii", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3] != "p" or fields[4] != "0":
                continue
            if len(fields) > 5 and fields[5] != "[heap]":  # a file, the stack, vdso ...
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `after` that no range of `before` covers, cut to whole 2 MiB pages, each of
    at least MIN_REGION."""
    out = []
    for region in after:
        for a0, a1 in _subtract(region, before):
            a0, a1 = -(-a0 // PAGE) * PAGE, a1 // PAGE * PAGE
            if a1 - a0 >= MIN_REGION:
                out.append((a0, a1))
    return sorted(out)


def _subtract(region: tuple[int, int], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    parts = [region]
    for b0, b1 in taken:
        left = []
        for a0, a1 in parts:
            if b1 <= a0 or b0 >= a1:  # no overlap
                left.append((a0, a1))
                continue
            if a0 < b0:
                left.append((a0, b0))
            if b1 < a1:
                left.append((b1, a1))
        parts = left
    return parts


@contextmanager
def huge_pages(enabled: bool = True) -> Iterator[HugePages]:
    """Ask for 2 MiB pages under the anonymous memory allocated inside the block (see the
    module's doc); the yielded HugePages says what was done once the block has run."""
    result = HugePages()
    why = "not asked for" if not enabled else unavailable()
    before: list[tuple[int, int]] = []
    had = 0
    if not why:
        try:
            before = anonymous_regions()
        except OSError as e:  # /proc not mounted (some containers)
            why = f"/proc/self/maps is not readable: {e}"
        had = anon_huge_mib()
    yield result
    if why:
        result.reason = why
        return
    import ctypes

    t = time.perf_counter()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    errors = set()
    try:
        after = anonymous_regions()
    except OSError as e:
        after, errors = [], {f"/proc/self/maps is not readable: {e}"}
    for a0, a1 in new_ranges(before, after):
        if libc.madvise(a0, a1 - a0, MADV_HUGEPAGE) != 0:
            errors.add(f"madvise(MADV_HUGEPAGE): {os.strerror(ctypes.get_errno())}")
            continue
        result.advised_mib += (a1 - a0) >> 20
        # EINVAL before Linux 6.1, and for a range holding pages it cannot move (it collapses
        # the rest); EAGAIN/ENOMEM when no free 2 MiB page was found
        if libc.madvise(a0, a1 - a0, MADV_COLLAPSE) != 0:
            errors.add(f"madvise(MADV_COLLAPSE): {os.strerror(ctypes.get_errno())}")
    result.collapsed_mib = max(0, anon_huge_mib() - had)
    result.seconds = time.perf_counter() - t
    if not result.collapsed_mib:
        result.reason = "; ".join(sorted(errors)) or "no new anonymous region of 16 MiB or more"


def anon_huge_mib(rollup: str = "/proc/self/smaps_rollup") -> int:
    """MiB of this process's anonymous memory on 2 MiB pages (0 where the kernel does not say)."""
    try:
        with open(rollup, encoding="ascii") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0
