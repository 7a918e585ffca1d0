"""One writer per folder: an ``flock`` on a file inside it, held while a process owns the folder
(a run directory, train/lock.py; a prepare's ``--out``, data/prepare.py).

The kernel drops an ``flock`` when its holder dies, however it dies (SIGKILL, OOM, a node
reboot), so there is never a stale lock to clean up; the file itself stays and only records who
held it last ("PID HOST"), so that a refusal can name the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def _holder(fd: int) -> str:
    """The holder's "PID N on host H", read from the lock file (written just after locking)."""
    for _ in range(50):  # the holder writes its line right after taking the lock
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text:
            pid, _, host = text.partition(" ")
            return f"PID {pid} on host {host or '?'}"
        time.sleep(0.02)
    return "another process (it has not written its PID yet)"


def open_lock(path: Path) -> int:
    """The lock file's descriptor, creating the file; the OSError is the caller's to word."""
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def holding(fd: int, refuse: Callable[[str], Exception]) -> Iterator[None]:
    """Hold the lock of ``fd`` (from :func:`open_lock`) for the block, and close ``fd`` after;
    raises ``refuse(holder)`` at once when another process holds it."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refuse(_holder(fd)) from None
        if os.fstat(fd).st_nlink == 0:
            # The holder we waited on removed the folder it had made (a run that failed before
            # writing anything), lock file and all: this file is no one's lock any more.
            raise refuse("a process that has just removed this folder")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and any missing parents; the folders this call created, outermost
    first (one another process made just now is not among them)."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made by another process just now: never ours to remove
            continue
        created.append(path)
    return created


def unmake_folders(created: list[Path], lock_file: Path | None = None) -> None:
    """Undo :func:`make_folders`: the folders it created are removed, innermost first, while
    they are empty, never one with anything in it (another process, or the user, may have put
    files there since). ``lock_file``, held by the caller, goes first when it is the last entry
    of a folder that was created."""
    if lock_file is not None and lock_file.parent in created:
        with contextlib.suppress(OSError):
            if os.listdir(lock_file.parent) == [lock_file.name]:
                lock_file.unlink()
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def holder_now(path: Path) -> str | None:
    """Who holds the lock at ``path`` now, or None (no holder, or no lock file); creates
    nothing, so a dry run (``train --check``) can ask."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
