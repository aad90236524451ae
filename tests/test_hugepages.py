"""backends/hugepages.py: which memory it picks, and that moving real memory onto 2 MiB pages
keeps every byte (the onnx engine's own check is in test_onnx_engine.py)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from hanlin.backends import hugepages
from hanlin.backends.hugepages import MIN_REGION, PAGE, huge_pages, new_ranges

MAPS = """\
5580a0000000-5580a0100000 r--p 00000000 08:01 123 /usr/bin/python3.11
5580a1000000-5580b1000000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
7f0004000000-7f0005000000 rw-s 00000000 00:01 77 /dev/shm/x
7f0005000000-7f0006000000 rw-p 00001000 08:01 124 /usr/lib/libfoo.so
7f0006000000-7f0006001000 ---p 00000000 00:00 0
7fff00000000-7fff00100000 rw-p 00000000 00:00 0 [stack]
"""


def test_anonymous_regions_are_private_writable_and_unnamed_or_the_heap(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert hugepages.anonymous_regions(str(maps)) == [(0x5580A1000000, 0x5580B1000000), (0x7F0000000000, 0x7F0004000000)]


def test_new_ranges_are_what_appeared_cut_to_whole_pages_and_large_enough():
    base = 0x7F0000000000
    before = [(base, base + 64 * PAGE)]
    after = [
        (base, base + 96 * PAGE + 4096),  # the old region grown by 32 pages and a bit
        (base + 200 * PAGE + 4096, base + 220 * PAGE),  # new, unaligned start: 19 whole pages
        (base + 300 * PAGE, base + 300 * PAGE + MIN_REGION - PAGE),  # new but under 16 MiB
    ]
    assert new_ranges(before, after) == [(base + 64 * PAGE, base + 96 * PAGE), (base + 201 * PAGE, base + 220 * PAGE)]
    # a region with an old one in its middle leaves two parts
    mid = [(base + 40 * PAGE, base + 50 * PAGE)]
    assert new_ranges(mid, [(base, base + 100 * PAGE)]) == [(base, base + 40 * PAGE), (base + 50 * PAGE, base + 100 * PAGE)]
    assert new_ranges(after, after) == []


def test_turned_off_says_so_and_touches_nothing(monkeypatch):
    monkeypatch.setenv("HANLIN_HUGE_PAGES", "0")
    with huge_pages() as hp:
        block = np.ones(8 << 20)  # 64 MiB
    assert hp.reason == "turned off by HANLIN_HUGE_PAGES" and hp.collapsed_mib == 0 and hp.advised_mib == 0
    with huge_pages(enabled=False) as hp:
        pass
    assert hp.reason == "not asked for"
    assert block.sum() == 8 << 20


def test_memory_allocated_inside_moves_to_huge_pages_with_its_contents(monkeypatch):
    monkeypatch.delenv("HANLIN_HUGE_PAGES", raising=False)  # conftest turns it off for the suite
    why = hugepages.unavailable()
    want = np.random.default_rng(0).standard_normal(12 << 20)  # 96 MiB of float64
    with huge_pages() as hp:
        # plain private anonymous memory, as onnxruntime's allocations are (numpy asks for huge
        # pages itself for arrays of 4 MiB and more, so an ndarray would not test the move)
        raw = mmap.mmap(-1, want.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block = np.frombuffer(raw, dtype=np.float64)
        block[:] = want  # filled in on 4 KiB pages
    np.testing.assert_array_equal(block, want)  # every byte survived the move
    if why:  # not Linux, or THP set to never: the reason, and nothing done
        assert hp.reason == why and hp.collapsed_mib == 0
        return
    assert hp.advised_mib >= 64, hp
    # MADV_COLLAPSE exists from Linux 6.1 on; before, the pages are only advised (khugepaged)
    assert hp.collapsed_mib >= 64 or "MADV_COLLAPSE" in hp.reason, hp
    assert hp.as_dict()["huge_pages_mib"] == hp.collapsed_mib


@pytest.mark.parametrize("mode,why", [("always [madvise] never", ""), ("always madvise [never]", "set to 'never'")])
def test_unavailable_reads_the_kernels_setting(tmp_path, monkeypatch, mode, why):
    monkeypatch.delenv("HANLIN_HUGE_PAGES", raising=False)
    f = tmp_path / "enabled"
    f.write_text(mode + "\n")
    monkeypatch.setattr(hugepages, "THP_MODE", str(f))
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    got = hugepages.unavailable()
    assert (why in got) if why else got == ""
    monkeypatch.setattr(hugepages, "THP_MODE", str(tmp_path / "missing"))
    assert "no transparent huge pages" in hugepages.unavailable()
