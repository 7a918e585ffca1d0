"""Files that are either wholly the old version or wholly the new one, never half written.

Every file a run or an export produces goes through here: the bytes are written to a temporary
name in the same directory (so the rename cannot cross file systems), flushed, fsynced, renamed
over the target, and the directory is fsynced so the rename itself survives a crash. A write that
fails (a full disk, a file-size limit) removes its temporary file and raises the ``OSError``; the
previous file is untouched. Callers turn the error into a one-line :class:`UserError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_the_way(tmp: Path) -> OSError:
    return OSError(errno.EEXIST, f"{tmp} is in the way and is not a file; remove it")


def open_temp(path: Path) -> BinaryIO:
    """``path``'s temp file, created or emptied; never opened through a symlink, nor a FIFO,
    a device or a hard link that holds the name (as root, a link there would overwrite its
    target, and a FIFO would block the write forever). Those raise an ``OSError`` naming the
    file."""
    tmp = temp_path(Path(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(tmp, flags, 0o644)
    except OSError as exc:  # ELOOP: a symlink; ENXIO: a FIFO that no one reads
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise _in_the_way(tmp) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise _in_the_way(tmp)
    os.set_blocking(fd, True)
    os.ftruncate(fd, 0)  # a leftover of a killed write
    return os.fdopen(fd, "wb")


@contextlib.contextmanager
def staged(path: Path) -> Iterator[BinaryIO]:
    """Write ``path``'s temp file through the yielded handle, fsynced; the caller renames it
    with :func:`commit` (several staged files can then be renamed together)."""
    tmp = temp_path(Path(path))
    handle = open_temp(path)  # what is in the way stays: it is not ours to remove
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(paths: list[Path]) -> None:
    """Rename the staged temp files of ``paths`` into place, then fsync their directories."""
    for path in paths:
        os.replace(temp_path(path), path)
    for directory in {Path(p).parent for p in paths}:
        fsync_dir(directory)


def discard(paths: list[Path]) -> None:
    """Remove the staged temp files of ``paths`` (after a later file of the set failed)."""
    for path in paths:
        temp_path(Path(path)).unlink(missing_ok=True)


def write_with(path: Path, writer: Callable[[BinaryIO], object]) -> None:
    """Atomically replace ``path`` with what ``writer`` writes to the handle it is given."""
    path = Path(path)
    with staged(path) as handle:
        writer(handle)
    try:
        commit([path])
    except BaseException:
        discard([path])
        raise


def write_all(files: list[tuple[Path, Callable[[BinaryIO], object]]]) -> None:
    """Replace several files as a set: all are staged first, then all renamed, so a failure
    while writing any of them (a full disk) leaves every previous file as it was."""
    staged_paths: list[Path] = []
    try:
        for path, writer in files:
            with staged(Path(path)) as handle:
                writer(handle)
            staged_paths.append(Path(path))
        commit(staged_paths)
    except BaseException:
        discard(staged_paths)
        raise


class _WriteOnly:
    """A handle that only writes: numpy then writes in plain chunks through it instead of
    ``ndarray.tofile``, whose failures lose the OS error ("N requested and M written")."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle

    def write(self, data: bytes) -> int:
        return self.handle.write(data)


def save_npy(handle: BinaryIO, array: np.ndarray) -> None:
    """``np.save`` to a staged handle, with the OS's own error (e.g. "No space left on device")
    when the write fails."""
    np.lib.format.write_array(_WriteOnly(handle), np.asanyarray(array), allow_pickle=False)


def write_atomically(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    write_with(path, lambda handle: handle.write(data))


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, text.encode("utf-8"))
