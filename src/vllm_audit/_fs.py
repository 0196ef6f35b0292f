"""File-system primitives for durable, append-only writing."""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes | bytearray) -> None:
    """``os.write`` until every byte is written (short writes happen near a full disk)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(d: str | os.PathLike[str] | Path) -> None:
    """Make a directory's entries (new or renamed files) durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` atomically: write a temporary file beside it, then rename.

    ``durable``: fsync the file before the rename and the directory after, so the new content
    survives a crash once this returns (cursors, indexes); without, readers still never see a
    partial file (status files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
