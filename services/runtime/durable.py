"""Durable file writes: the one way anything under the home is replaced.

`write_atomic()` writes a temp file beside the target, fsyncs it, renames it over the
target and fsyncs the directory, so a reader (or a restart after kill -9 or a power
cut) sees the old content or the new, never a torn file. Files are created 0600: the
home is the owner's alone. `remove_temp_files()` clears what a killed writer left.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o600


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (ignored where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None],
                 mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` (bytes, or a function writing to the open file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_temp_files(directory: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temp files a killed writer of `directory/name` left; returns them."""
    removed = []
    for tmp in Path(directory).glob(f".{name}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed
