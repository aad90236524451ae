"""Files that are whole or absent: what every writer of a model file in hanlin goes through."""

from __future__ import annotations

import os
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
