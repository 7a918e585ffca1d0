"""Stop requests from the outside world: SLURM's pre-timeout SIGUSR2 and a plain SIGTERM.

The handler only sets a flag; the training loop polls it at step boundaries, all ranks agree
through a collective, rank 0 saves a checkpoint, and (for SIGUSR2 under SLURM) requeues the job.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = reason

    def install(self) -> "StopRequest":
        """Catch SIGUSR2 and SIGTERM in the main thread."""
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signal.Signals(signum).name)


def requeue_slurm_job(environ: Mapping[str, str], say=print) -> bool:
    """Ask SLURM to requeue this job (after a SIGUSR2 warning); False when not under SLURM."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        say(f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.returncode}")
        return False
    say(f"requeued SLURM job {job_id}")
    return True
