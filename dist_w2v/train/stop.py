"""Stop requests from the outside world: SLURM's pre-timeout SIGUSR2 and a plain SIGTERM.

The handler only sets a flag; the training loop polls it at step boundaries, all ranks agree
through a collective, rank 0 saves a checkpoint, and (for SIGUSR2 under SLURM) has the job
requeued.

The signal must reach the worker processes (``dist-w2v train``), not only their launcher:
torchrun's default action on SIGUSR2 is to die, so slurm/train.sbatch starts torchrun with
SIGUSR2 *blocked* (the mask survives exec and fork), while SLURM's ``--signal=USR2@T`` delivers
it to every process of the step. Workers inherit the mask; :meth:`StopRequest.install` unblocks
the stop signals once its handler is in place, so a signal that arrived during start-up is
delivered then rather than lost (an ignored signal would be discarded).
SIGTERM may reach the workers directly or through torchrun, which forwards it and waits 30 s.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dist_w2v.atomic import write_text_atomically

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
PRECEDENCE = ("SIGTERM", "SIGUSR2")
"""When ranks were stopped by different signals, the later one here is the run's reason: a
SIGUSR2 anywhere means SLURM is about to end the job, which rank 0 must then requeue."""


class StopRequest:
    """A flag set by SIGUSR2/SIGTERM; as a context manager it restores the previous handlers."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._blocked: set[signal.Signals] = set()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def code(self) -> int:
        """The reason as a number for a collective (0: none; larger wins, see PRECEDENCE)."""
        return 0 if self.reason is None else PRECEDENCE.index(self.reason) + 1

    def adopt(self, code: int) -> None:
        """Take the reason the ranks agreed on: a signal may have reached another rank only."""
        if code:
            self.reason = PRECEDENCE[code - 1]

    def install(self) -> StopRequest:
        """Catch SIGUSR2 and SIGTERM (main thread only, as Python requires), then unblock them:
        one that arrived while blocked (the launcher blocks USR2) is delivered now."""
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._blocked = set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def uninstall(self) -> None:
        if self._blocked:  # hand the process back as it came
            signal.pthread_sigmask(signal.SIG_BLOCK, self._blocked)
            self._blocked = set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signal.Signals(signum).name)


REQUEUE_MARKER_VAR = "DIST_W2V_REQUEUE_MARKER"


def requeue_slurm_job(environ: Mapping[str, str], say: Callable[[str], None] = print,
                      step: int | None = None) -> bool:
    """Have SLURM requeue this job after a SIGUSR2 warning; False when that cannot happen.

    Under slurm/train.sbatch (which sets ``$DIST_W2V_REQUEUE_MARKER``) rank 0 only writes its
    global ``step`` to that file: the batch script requeues once ``srun`` has returned, so the
    job step ends cleanly (a requeue cancels whatever of the job still runs), and it refuses to
    requeue an attempt that made no progress. Elsewhere under SLURM (``srun dist-w2v train`` in
    a script of one's own) rank 0 runs ``scontrol requeue`` itself: the job is requeued, but
    SLURM cancels the step while the ranks exit, so its exit code reads as a failure.

    A failure is reported, not raised: the checkpoint is already safe, and the job can still be
    resubmitted by hand with ``--resume auto``.
    """
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        say("stopped outside SLURM (no SLURM_JOB_ID); rerun with --resume auto to continue")
        return False
    marker = environ.get(REQUEUE_MARKER_VAR)
    if marker:
        return leave_requeue_marker(marker, job_id, step, say)
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


def leave_requeue_marker(path: str, job_id: str, step: int | None,
                         say: Callable[[str], None]) -> bool:
    """Write ``step`` to the batch script's marker file (atomically: temp file, then rename);
    ``unknown`` without a step, which the script requeues without comparing progress."""
    try:
        write_text_atomically(Path(path), f"{step if step is not None else 'unknown'}\n")
    except OSError as exc:
        say(f"cannot write the requeue marker {path} ({exc.strerror}); "
            "resubmit with --resume auto")
        return False
    say(f"SLURM job {job_id} will be requeued by its batch script (global step {step})")
    return True
