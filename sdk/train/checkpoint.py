"""Checkpoints that survive a kill -9 at any moment, and are checked before they are trusted.

    OUT/checkpoints/step-0000100/
        state/          what the strategy saves (one file in one process; one shard per rank
                        with DeepSpeed ZeRO or torch.distributed.checkpoint under FSDP2)
        meta.json       step, strategy, world size, tokens seen
        MANIFEST.json   sha256 and size of every file above; written last

Every rank writes into `.tmp-step-0000100/`; after a barrier rank 0 hashes the files, writes
the manifest, fsyncs and renames the folder to `step-0000100/`. A folder without a manifest,
or whose files do not match it, is not a checkpoint: `newest_good` skips it (saying why) and
`--resume auto` takes the newest one that verifies.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from hanlin.backends.files import replace_folder
from hanlin.train.shards import sha256_file

PREFIX = "step-"
MANIFEST = "MANIFEST.json"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:07d}")


def tmp_dir(root: str, step: int) -> str:
    return os.path.join(root, f".tmp-{PREFIX}{step:07d}")


def _files(folder: str) -> list[str]:
    out = []
    for base, _, names in os.walk(folder):
        for name in names:
            out.append(os.path.relpath(os.path.join(base, name), folder))
    return sorted(p for p in out if p != MANIFEST)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: str, final: str, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank has written into `tmp`: meta, manifest, rename."""
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    files = {}
    for rel in _files(tmp):
        path = os.path.join(tmp, rel)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[rel] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    replace_folder(tmp, final, prefix=".tmp-")  # an older save of the same step (a rerun): replaced, never merged
    _fsync_dir(os.path.dirname(final))


def verify(folder: str) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return "no MANIFEST.json (the save did not finish)"
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"MANIFEST.json unreadable ({e})"
    present = set(_files(folder))
    for rel, rec in files.items():
        p = os.path.join(folder, rel)
        if rel not in present:
            return f"{rel} is missing"
        if os.path.getsize(p) != rec["bytes"]:
            return f"{rel} has {os.path.getsize(p)} bytes, the manifest says {rec['bytes']}"
        if sha256_file(p) != rec["sha256"]:
            return f"{rel} fails its checksum"
    extra = present - set(files)
    if extra:
        return f"{sorted(extra)[0]} is not in the manifest"
    return None


def listed(root: str) -> list[tuple[int, str]]:
    """(step, folder) of every sealed checkpoint folder, oldest first (not yet verified)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            out.append((int(name[len(PREFIX):]), os.path.join(root, name)))
    return sorted(out)


def newest_good(root: str, warn: Callable[[str], None] = print) -> tuple[int, str] | None:
    for step, folder in reversed(listed(root)):
        problem = verify(folder)
        if problem is None:
            return step, folder
        warn(f"checkpoint {folder} skipped: {problem}")
    return None


def read_meta(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def prune(root: str, keep: int) -> None:
    """Keep the newest `keep` sealed checkpoints; drop leftovers of interrupted saves."""
    for _, folder in listed(root)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
