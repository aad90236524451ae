"""The workspace: the one directory whose files the agent's tools may read.

A path the model gives is taken relative to the workspace; it is refused when it contains
`..`, when it is absolute and outside, or when a symbolic link on the way leads outside
(real paths are compared, so a link inside pointing inside is fine). The file is then
opened component by component from the workspace with O_NOFOLLOW, so a link swapped in
after the check cannot lead the open elsewhere. Only regular files are read (a FIFO or a
device would block or never end), and only up to a size limit.
"""

from __future__ import annotations

import os
import stat
from .tools import Tool, ToolError, tool

READ_LIMIT = 256 * 1024  # bytes read_file returns at most
LISTING_LIMIT = 100  # entries shown for a directory


def workspace_root(workspace: str | os.PathLike[str]) -> str:
    """The workspace's real path, or a ValueError when it is not a directory."""
    root = os.path.realpath(os.fspath(workspace))
    if not os.path.isdir(root):
        raise ValueError(f"the workspace {os.fspath(workspace)!r} is not a directory")
    return root


def resolve(root: str, path: str) -> str:
    """The real path of `path` inside the workspace `root` (a real path), or a ToolError
    that says why it is refused."""
    if not isinstance(path, str) or not path.strip():
        raise ToolError("the path is empty; give a path relative to the workspace, e.g. 'notes.txt'", parameter="path")
    if "\0" in path:
        raise ToolError("the path contains a NUL character", parameter="path")
    if ".." in path.replace("\\", "/").split("/"):
        raise ToolError(f"{path!r} contains '..': paths are relative to the workspace and may not leave it", parameter="path")
    if os.path.isabs(path) and not _inside(os.path.normpath(path), root):
        raise ToolError(f"{path!r} is outside the workspace; give a path relative to it, e.g. 'notes.txt'", parameter="path")
    real = os.path.realpath(os.path.join(root, path))
    if not _inside(real, root):
        raise ToolError(f"{path!r} leads outside the workspace through a symbolic link", parameter="path")
    return real


def open_inside(root: str, real: str, *, directory: bool = False) -> int:
    """A descriptor of `real` (from resolve()), opened from `root` one component at a time
    without following any link. The caller closes it."""
    relative = os.path.relpath(real, root)
    parts = [] if relative == "." else relative.split(os.sep)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= (os.O_DIRECTORY if directory else os.O_NONBLOCK) if last else os.O_DIRECTORY
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_text(root: str, path: str, max_bytes: int = READ_LIMIT) -> str:
    """The text of a workspace file (at most `max_bytes`, with a note when cut), or the
    entries of a workspace directory."""
    real = resolve(root, path)
    try:
        fd = open_inside(root, real)
    except FileNotFoundError:
        raise ToolError(f"there is no file {path!r} in the workspace", parameter="path") from None
    except OSError as exc:  # ELOOP: a link swapped in after the check; EACCES
        raise ToolError(f"cannot open {path!r}: {exc.strerror or exc}", parameter="path") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            return _listing(root, real, path)
        raise ToolError(f"{path!r} is not a regular file", parameter="path")
    with open(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if b"\0" in data[:8192]:
        raise ToolError(f"{path!r} looks like a binary file ({info.st_size:,} bytes); read_file reads text", parameter="path")
    text = data[:max_bytes].decode("utf-8", errors="replace")
    if len(data) > max_bytes:
        text += f"\n[... cut: the file has {info.st_size:,} bytes; this is the first {max_bytes:,}]"
    return text


def snapshot(root: str, max_bytes: int) -> tuple[dict[str, bytes], list[str]]:
    """Every regular file of the workspace as {relative path: contents}, for a sandboxed run
    to start with, and notes on what was left out (links leading outside, special files).
    More than `max_bytes` in all is a ToolError: copying it for every run would be slow."""
    files: dict[str, bytes] = {}
    skipped: list[str] = []
    total = 0
    for folder, dirs, names in os.walk(root):  # links to directories are listed, not followed
        for name in sorted(d for d in dirs if os.path.islink(os.path.join(folder, d))):
            skipped.append(os.path.relpath(os.path.join(folder, name), root) + " (a link to a folder: not followed)")
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            try:
                real = resolve(root, relative)
                fd = open_inside(root, real)
            except (ToolError, OSError):
                skipped.append(f"{relative} (a link leading outside the workspace, or unreadable)")
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                skipped.append(f"{relative} (not a regular file)")
                continue
            with open(fd, "rb") as f:
                data = f.read(max_bytes - total + 1)
            total += len(data)
            if total > max_bytes:
                raise ToolError(f"the workspace holds more than {max_bytes >> 20} MB of files, too much to copy into each run")
            files[relative] = data
    return files, skipped


def read_file_tool(workspace: str | os.PathLike[str], *, max_bytes: int = READ_LIMIT) -> Tool:
    """The read_file tool over one workspace directory."""
    root = workspace_root(workspace)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")

    def read_file(path: str) -> str:
        """Read a text file from the workspace (or list a folder of it). Long files are cut,
        with a note saying so.

        Args:
            path: the file's path relative to the workspace, e.g. "notes/todo.md"; "." lists the workspace.
        """
        return read_text(root, path, max_bytes)

    return tool(read_file)


def _listing(root: str, real: str, path: str) -> str:
    fd = open_inside(root, real, directory=True)
    try:
        entries = sorted(os.scandir(fd), key=lambda e: e.name)
        shown = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries[:LISTING_LIMIT]]
    finally:
        os.close(fd)
    more = f"\n[... and {len(entries) - LISTING_LIMIT} more]" if len(entries) > LISTING_LIMIT else ""
    return f"{path!r} is a folder holding:\n" + ("\n".join(shown) or "(nothing)") + more


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

