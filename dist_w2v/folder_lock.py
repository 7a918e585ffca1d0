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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


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
