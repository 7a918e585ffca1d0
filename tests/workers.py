"""Real ``dist-w2v train`` processes for the checkpoint, restart and preemption tests.

Every launch gets its own session (process group), so the test can signal the whole group and
always kills whatever is left of it (torchrun and its workers) when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from conftest import REPO, SMOKE, cli_env

# Small enough for a few seconds per run: 2,000 PTB sentences give about 71 steps per epoch.
TINY = (*SMOKE, "train.batch_size=128", "log.every_steps=10")


def train_command(nproc: int, *args: str, torchrun_args: Sequence[str] = ()) -> list[str]:
    """``dist-w2v train ARGS`` as a plain process (nproc=0) or under torchrun --standalone."""
    cli = ["-m", "dist_w2v.cli", "train", "--config", "configs/ptb.yaml", *args]
    if nproc == 0:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *torchrun_args, *cli]


LAUNCH_TAG = "DIST_W2V_TEST_LAUNCH"


def tagged_pids(tag: str) -> list[int]:
    """Live processes carrying ``LAUNCH_TAG=tag`` in their environment: torchrun and its workers.

    torchrun starts every worker in a session of its own, so a process group does not reach
    them, and orphans lose their parent; the inherited environment finds them all, much as
    SLURM's cgroup finds every process of a job step.
    """
    needle = f"{LAUNCH_TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def signal_all(proc: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to every process of the launch (what SLURM's --signal does to a step)."""
    for pid in tagged_pids(proc.tag):  # type: ignore[attr-defined]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything it started, wherever their sessions are."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)  # no new workers while we collect them
    signal_all(proc, signal.SIGKILL)
    proc.wait()


def alive(proc: subprocess.Popen) -> list[int]:
    return tagged_pids(proc.tag)  # type: ignore[attr-defined]


@contextlib.contextmanager
def launched(command: list[str], log: Path, env: dict[str, str] | None = None,
             preexec_fn: Callable[[], None] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``command`` with output to ``log``; all its processes are killed on exit."""
    tag = uuid.uuid4().hex
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env=cli_env({**(env or {}), LAUNCH_TAG: tag}), cwd=REPO,
                                start_new_session=True, preexec_fn=preexec_fn)
    proc.tag = tag  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        kill_all(proc)


def run(command: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120,
        preexec_fn: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run to completion; (exit code, combined output)."""
    with launched(command, log, env, preexec_fn) as proc:
        code = proc.wait(timeout=timeout)
    return code, log.read_text()


def wait_for_step_line(run_dir: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Block until rank 0 has logged a training step (so the loop is running)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and '"kind": "step"' in metrics.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before its first step")
        time.sleep(0.02)
    raise AssertionError(f"no step logged in {metrics} within {timeout} s")


def tables(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(run_dir / "center.npy"), np.load(run_dir / "context.npy")


def max_table_diff(a: Path, b: Path) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(tables(a), tables(b), strict=True))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_keys(run_dir: Path) -> list[tuple]:
    """What was logged, in order, without the values: resume must neither drop nor repeat."""
    return [(r["kind"], r["epoch"], r.get("step"), r["global_step"]) for r in metrics(run_dir)]


def epoch_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if r["kind"] == "epoch"]
