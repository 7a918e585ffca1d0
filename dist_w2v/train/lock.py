"""One run per run directory: rank 0 holds an ``flock`` on ``RUN_DIR/.lock`` for the whole run.

The kernel drops an ``flock`` when its holder dies, however it dies (SIGKILL, OOM, a node
reboot), so there is never a stale lock to clean up; the file itself stays and only records who
held it last. A second ``train`` on the same directory is refused, naming the holder's PID and
host, before it writes anything there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dist_w2v.errors import UserError

LOCK_FILE = ".lock"


def _holder(fd: int) -> str:
    """The holder's "PID N on host H", read from the lock file (written just after locking)."""
    for _ in range(50):  # the holder writes its line right after taking the lock
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text:
            pid, _, host = text.partition(" ")
            return f"PID {pid} on host {host or '?'}"
        time.sleep(0.02)
    return "another process (it has not written its PID yet)"


def _refuse(run_dir: Path, fd: int) -> UserError:
    return UserError(
        f"run directory {run_dir} is in use by {_holder(fd)} (lock {run_dir / LOCK_FILE}); "
        "wait for that run to end, or choose another --run-dir"
    )


def check_unlocked(run_dir: Path) -> None:
    """Raise when a live process holds ``run_dir``'s lock; creates nothing (for --check)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file (or no run dir): nobody holds it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(run_dir, fd) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (creating the directory); refuse when taken."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot write to run directory {run_dir} ({exc.strerror}); "
                        "choose a writable --run-dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(run_dir, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
