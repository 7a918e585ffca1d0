"""One run per run directory: rank 0 holds the lock ``RUN_DIR/.lock`` (folder_lock.py) for the
whole run. A second ``train`` on the same directory is refused, naming the holder's PID and
host, before it writes anything there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from dist_w2v.errors import UserError
from dist_w2v.folder_lock import holder_now, holding, open_lock

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
    """Hold ``run_dir``'s lock for the block (creating the directory); refuse when taken."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_lock(run_dir / LOCK_FILE)
    except OSError as exc:
        raise UserError(f"cannot write to run directory {run_dir} ({exc.strerror}); "
                        "choose a writable --run-dir") from None
    with holding(fd, lambda holder: _refuse(run_dir, holder)):
        yield
