"""One run per run directory: rank 0 holds the lock ``RUN_DIR/.lock`` (folder_lock.py) for the
whole run. A second ``train`` on the same directory is refused, naming the holder's PID and
host, before it writes anything there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from dist_w2v.errors import UserError
from dist_w2v.folder_lock import holder_now, holding, make_folders, open_lock, unmake_folders

LOCK_FILE = ".lock"


def _refuse(run_dir: Path, holder: str) -> UserError:
    return UserError(
        f"run directory {run_dir} is in use by {holder} (lock {run_dir / LOCK_FILE}); "
        "wait for that run to end, or choose another --run-dir"
    )


def check_unlocked(run_dir: Path) -> None:
    """Raise when a live process holds ``run_dir``'s lock; creates nothing (for --check)."""
    holder = holder_now(Path(run_dir) / LOCK_FILE)
    if holder is not None:
        raise _refuse(run_dir, holder)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (creating the directory); refuse when taken.

    A run refused before it wrote anything (a missing corpus, another run's checkpoint) leaves
    no folder behind that it made: an empty run dir holding only a lock would read as a run.
    """
    run_dir = Path(run_dir)
    created: list[Path] = []
    try:
        created = make_folders(run_dir)
        fd = open_lock(run_dir / LOCK_FILE)
    except OSError as exc:
        unmake_folders(created)
        raise UserError(f"cannot write to run directory {run_dir} ({exc.strerror}); "
                        "choose a writable --run-dir") from None
    with holding(fd, lambda holder: _refuse(run_dir, holder)):
        try:
            yield
        finally:
            unmake_folders(created, run_dir / LOCK_FILE)
