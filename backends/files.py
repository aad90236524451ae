"""Files that are whole or absent: what every writer of a model file in hanlin goes through."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def written_at(out: str, *, prefix: str = ".hanlin-", suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside `out` (same folder, so the rename cannot cross disks);
    when the block ends normally it is renamed to `out`, when it raises (Ctrl-C, disk full, a
    failed writer) it is removed, so `out` is never half-written."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(out))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def folder_written_at(out: str, *, prefix: str = ".hanlin-") -> Iterator[str]:
    """written_at for a folder: yield an empty temporary folder beside `out`; when the block
    ends normally it takes out's place (an older `out` is moved aside first and removed only
    after the new one is in place), when it raises the temporary folder is removed."""
    out = os.path.abspath(out.rstrip("/"))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder: remove it or choose another output")
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        replace_folder(tmp, out, prefix=prefix)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: str, out: str, *, prefix: str = ".hanlin-") -> None:
    """Rename the finished folder `new` to `out` (same parent). An older `out` is moved aside
    first and removed only once the new one is in place, so at every moment one complete
    folder sits at `out` or beside it: a crash in between never loses both."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=prefix + "old-", dir=os.path.dirname(os.path.abspath(out)))
        os.replace(out, os.path.join(old, "x"))
    os.replace(new, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Write a small text file (a manifest, a report, a log) whole or not at all: a temp file
    beside it, fsynced, then renamed over it."""
    with written_at(path, prefix=f".{os.path.basename(path)}-") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
