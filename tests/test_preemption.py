"""SLURM's pre-timeout SIGUSR2 and a plain SIGTERM, sent to real running jobs.

Signal delivery assumed here, and by slurm/ (coordinate any change there): SLURM's
``--signal=USR2@T`` reaches every process of the job step, and the launch line keeps torchrun
alive through SIGUSR2 (its default action would kill it and orphan the workers): slurm/train.sbatch
starts it with SIGUSR2 blocked, which the workers unblock once their handler is in. The tests
below start torchrun with SIGUSR2 ignored, which works the same once the workers run (they
install their own handler); the signal goes to every process of the launch, torchrun included
(workers.signal_all). Without $DIST_W2V_REQUEUE_MARKER (not under slurm/train.sbatch) rank 0
runs ``scontrol requeue`` itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env
from workers import (
    TINY,
    alive,
    launched,
    metrics,
    signal_all,
    train_command,
    wait_for_step_line,
)

from dist_w2v.cli import main
from dist_w2v.train.checkpoint import read_checkpoint
from dist_w2v.train.stop import requeue_slurm_job

JOB_ID = "4242"
# Long enough that no run finishes before the signal lands; the runs are stopped, not finished.
MANY_EPOCHS = "train.epochs=50"


@pytest.fixture
def slurm(tmp_path) -> tuple[dict[str, str], Path]:
    """A stub ``scontrol`` first on PATH that records its arguments, and SLURM_JOB_ID."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": JOB_ID}
    return env, calls


def ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def stop_line_step(out: str, reason: str) -> int:
    """The global step of ``stopped by REASON at step N; checkpoint saved ...``."""
    line = next(line for line in out.splitlines() if line.startswith(f"stopped by {reason}"))
    return int(line.split(" at step ")[1].split(";")[0])


def usr2_under_torchrun(small_corpus: Path, tmp_path: Path, env: dict[str, str],
                        send: Callable[[subprocess.Popen], None]) -> str:
    """Two ranks under torchrun (SIGUSR2 ignored by torchrun, as under slurm/train.sbatch)
    training into tmp_path/run; ``send`` signals them once a step line is logged. The log, after
    torchrun exited 0 with no worker left."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    command = train_command(2, "--run-dir", str(run_dir), f"data.corpus={small_corpus}", *TINY,
                            MANY_EPOCHS, "log.every_steps=5")
    with launched(command, log, env, preexec_fn=ignore_usr2) as proc:
        wait_for_step_line(run_dir, proc)
        send(proc)
        code = proc.wait(timeout=120)
        out = log.read_text()
        assert code == 0, out  # torchrun exits 0 only when both workers did
        assert alive(proc) == [], "a worker outlived torchrun"
    return out


def test_usr2_checkpoints_requeues_and_the_next_run_resumes(small_corpus, tmp_path, slurm):
    env, calls = slurm
    run_dir = tmp_path / "run"
    out = usr2_under_torchrun(small_corpus, tmp_path, env, lambda proc: signal_all(
        proc, signal.SIGUSR2))

    step = stop_line_step(out, "SIGUSR2")
    checkpoint = run_dir / "checkpoints" / f"step-{step:09d}.pt"
    state = read_checkpoint(checkpoint)["state"]
    assert state["global_step"] == step and state["epoch"] < 49
    assert calls.read_text() == f"requeue {JOB_ID}\n"
    assert f"requeued SLURM job {JOB_ID}" in out
    assert not (run_dir / "center.npy").exists()  # stopped, not finished

    # The requeued job: the same command with --resume auto (one process here, which the
    # world-size-independent sharding allows), finishing the interrupted epoch.
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--config", str(REPO / "configs" / "ptb.yaml"), "--run-dir",
                     str(run_dir), f"data.corpus={small_corpus}", *TINY,
                     f"train.epochs={state['epoch'] + 1}", "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert (run_dir / "center.npy").is_file()
    epochs = [r["epoch"] for r in metrics(run_dir) if r["kind"] == "epoch"]
    assert epochs == list(range(1, state["epoch"] + 2))


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The worker of the launch whose environment says RANK=rank."""
    needle = f"RANK={rank}".encode()
    for pid in alive(proc):
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_usr2_that_reaches_only_rank_1_still_requeues(small_corpus, tmp_path, slurm):
    """The ranks agree to stop every few steps; a signal that has reached rank 1 but not yet
    rank 0 stopped them all, and rank 0, which had no reason of its own, logged "stopped by
    None" and did not requeue: the job ended at SLURM's time limit."""
    env, calls = slurm
    out = usr2_under_torchrun(small_corpus, tmp_path, env, lambda proc: os.kill(
        rank_pid(proc, 1), signal.SIGUSR2))
    assert stop_line_step(out, "SIGUSR2") > 0, out
    assert "stopped by None" not in out
    assert calls.read_text() == f"requeue {JOB_ID}\n"


def test_sigterm_checkpoints_and_exits_cleanly_without_requeue(small_corpus, tmp_path, slurm):
    env, calls = slurm
    run_dir, log = tmp_path / "run", tmp_path / "log"
    command = train_command(0, "--run-dir", str(run_dir), f"data.corpus={small_corpus}", *TINY,
                            MANY_EPOCHS, "log.every_steps=5")
    with launched(command, log, env) as proc:
        wait_for_step_line(run_dir, proc)
        signal_all(proc, signal.SIGTERM)
        code = proc.wait(timeout=120)
        out = log.read_text()
    assert code == 0, out
    step = stop_line_step(out, "SIGTERM")
    assert read_checkpoint(run_dir / "checkpoints" / f"step-{step:09d}.pt")["state"][
        "global_step"] == step
    assert not calls.exists()  # SIGTERM (scancel, time limit) saves but does not requeue


def test_ctrl_c_under_torchrun_says_so_once_and_keeps_the_checkpoints(small_corpus, tmp_path):
    """Ctrl-C reaches every process of the launch: the run stops at once, without a new
    checkpoint; one line says so (not one per rank), and the saved checkpoints stay good."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    command = train_command(2, "--run-dir", str(run_dir), f"data.corpus={small_corpus}", *TINY,
                            MANY_EPOCHS, "log.every_steps=5", "ckpt.every_steps=5")
    with launched(command, log) as proc:
        wait_for_step_line(run_dir, proc)
        while not list((run_dir / "checkpoints").glob("step-*.pt")):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        signal_all(proc, signal.SIGINT)
        code = proc.wait(timeout=120)
        out = log.read_text()
        assert alive(proc) == [], "a worker outlived torchrun"
    assert code != 0
    assert out.count("dist-w2v: interrupted; the checkpoints saved so far are kept") == 1, out
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        read_checkpoint(path)  # raises for a damaged one


# -- the pieces slurm/train.sbatch relies on ------------------------------------------------------


def block_usr2() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})


# A worker's start-up in miniature: USR2 arrives before the handler exists, then StopRequest.
EARLY_USR2 = """
import os, signal
os.kill(os.getpid(), signal.SIGUSR2)
from dist_w2v.train.stop import StopRequest
with StopRequest() as stop:
    print(stop.reason, signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, []))
print(signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


def test_usr2_that_arrived_while_blocked_is_delivered_when_the_handler_is_installed():
    """slurm/train.sbatch starts torchrun (and so the workers) with SIGUSR2 blocked; a USR2
    sent while a worker starts up stays pending and must stop the run once StopRequest is
    installed (an ignored one would be lost). Afterwards the mask is handed back as it came."""
    result = subprocess.run([sys.executable, "-c", EARLY_USR2], capture_output=True, text=True,
                            timeout=60, env=cli_env(), cwd=REPO, preexec_fn=block_usr2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SIGUSR2", "False", "True"]


def test_under_the_batch_script_rank_0_leaves_its_step_and_does_not_requeue(tmp_path,
                                                                            monkeypatch):
    """A requeue cancels what of the job still runs: slurm/train.sbatch requeues after srun
    returned; the trainer only leaves its global step in the marker file the script named."""
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args}: the batch script requeues, not the trainer")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    marker, said = tmp_path / ".dist-w2v-7.requeue", []
    environ = {"SLURM_JOB_ID": "7", "DIST_W2V_REQUEUE_MARKER": str(marker)}
    assert requeue_slurm_job(environ, say=said.append, step=120)
    assert marker.read_text() == "120\n"
    assert said == ["SLURM job 7 will be requeued by its batch script (global step 120)"]

    environ["DIST_W2V_REQUEUE_MARKER"] = str(tmp_path / "missing" / "marker")
    assert not requeue_slurm_job(environ, say=said.append, step=130)
    assert "resubmit with --resume auto" in said[-1]
