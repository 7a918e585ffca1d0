"""Stop requests from the outside world: SLURM's pre-timeout SIGUSR2 and a plain SIGTERM.

The handler only sets a flag; the training loop polls it at step boundaries, all ranks agree
through a collective, rank 0 saves a checkpoint, and (for SIGUSR2 under SLURM) requeues the job.

The signal must reach the worker processes (``dist-w2v train``), not only their launcher:
torchrun's default action on SIGUSR2 is to die, so the launch line has to make torchrun ignore
it (``trap '' USR2`` before ``exec torchrun``; workers inherit the ignore and then install the
handler below) while SLURM's ``--signal=USR2@T`` delivers it to every process of the step.
SIGTERM may reach the workers directly or through torchrun, which forwards it and waits 30 s.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    """A flag set by SIGUSR2/SIGTERM; as a context manager it restores the previous handlers."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = reason

    def install(self) -> StopRequest:
        """Catch SIGUSR2 and SIGTERM (main thread only, as Python requires)."""
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signal.Signals(signum).name)


def requeue_slurm_job(environ: Mapping[str, str], say: Callable[[str], None] = print) -> bool:
    """Ask SLURM to requeue this job (after a SIGUSR2 warning); False when not under SLURM.

    A failed requeue is reported, not raised: the checkpoint is already safe, and the job can
    still be resubmitted by hand with ``--resume auto``.
    """
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        say("stopped outside SLURM (no SLURM_JOB_ID); rerun with --resume auto to continue")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"scontrol requeue {job_id} failed ({exc}); resubmit with --resume auto")
        return False
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit {result.returncode}"
        say(f"scontrol requeue {job_id} failed ({detail}); resubmit with --resume auto")
        return False
    say(f"requeued SLURM job {job_id}")
    return True
