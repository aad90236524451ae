"""backends/files.py: a folder is replaced whole, and a failure half-way loses nothing."""

from __future__ import annotations

import os

import pytest

from hanlin.backends import files


def make(folder, text: str) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "data.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    return str(folder)


def everything_under(root) -> dict[str, str]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                found[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return found


def test_replace_folder_swaps_in_the_new_one_and_leaves_nothing_beside(tmp_path):
    out = make(tmp_path / "ckpt", "old")
    new = make(tmp_path / ".tmp-new", "new")
    files.replace_folder(new, out)
    assert everything_under(tmp_path) == {os.path.join("ckpt", "data.txt"): "new"}


def test_a_failure_between_the_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    out = make(tmp_path / "ckpt", "old")
    new = make(tmp_path / ".tmp-new", "new")
    real = os.replace
    calls = []

    def failing_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old one is aside, the new one not yet in place: a crash here
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk gone"):
        files.replace_folder(new, out)
    kept = everything_under(tmp_path)
    assert "old" in kept.values() and "new" in kept.values(), kept  # both whole, neither removed


def test_folder_written_at_removes_its_temporary_folder_when_the_writer_fails(tmp_path):
    out = make(tmp_path / "model", "old")
    with pytest.raises(RuntimeError):
        with files.folder_written_at(out) as tmp:
            with open(os.path.join(tmp, "data.txt"), "w", encoding="utf-8") as f:
                f.write("half")
            raise RuntimeError("writer failed")
    assert everything_under(tmp_path) == {os.path.join("model", "data.txt"): "old"}
