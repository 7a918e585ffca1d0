"""slurm/train.sbatch under a real SLURM: a private single-host cluster (slurm/local-cluster.sh,
its own munge key and socket, config, state and ports in a pytest temp folder, stopped by PID
afterwards), and the real batch script submitted with sbatch.

* a tiny job completes (and is the uninterrupted reference for the next test);
* ``scancel --signal=USR2 JOB`` -> checkpoint -> requeue by the batch script -> resume: the
  tables equal the uninterrupted run's, and the step ends cleanly (no cancel, no traceback);
* two jobs at once on the node both complete (each has its own rendezvous port);
* USR2 to the batch shell (``scancel --signal=USR2 --batch``) does not kill the job: it is
  forwarded to the step, which checkpoints, and the job is requeued and completes.

Requeued jobs wait cred_expire seconds (AuthInfo in slurm.conf, default 120) before they may
start again; the test cluster sets 5 (DIST_W2V_SLURM_REQUEUE_DELAY). Skipped with one line where
SLURM is not installed or this is not root; under CI (env CI set) that is a failure instead.
Deselect with ``-m "not slurm"``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMOKE, cli_env

pytestmark = pytest.mark.slurm

BASH = shutil.which("bash") or "/bin/bash"
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
SBATCH = REPO / "slurm" / "train.sbatch"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
REQUEUE_DELAY = 5  # seconds: the shortest cred_expire SLURM accepts
# A few seconds of training (about 2,800 steps), so that a signal sent at step 50 lands mid-run.
JOB_ARGS = (*SMOKE, "train.epochs=20", "log.every_steps=50")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def why_not_runnable() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install " \
               "slurm-wlm munge"
    if os.geteuid() != 0:
        return "the single-host SLURM cluster needs root (slurmd starts the jobs)"
    return None


@dataclass
class Cluster:
    conf: str
    directory: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment sbatch exports to the job: this checkout's Python first."""
        python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        return cli_env({
            "SLURM_CONF": self.conf,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": python_path,
            **(extra or {}),
        })

    def run(self, *command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env=self.env())
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not_runnable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DIST_W2V_SLURM_DIR": str(directory),
           "DIST_W2V_SLURM_REQUEUE_DELAY": str(REQUEUE_DELAY)}
    try:
        result = subprocess.run([BASH, str(LOCAL_CLUSTER), "start"], capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        conf = re.search(r"^export SLURM_CONF=(\S+)$", result.stdout, flags=re.M)
        assert conf, result.stdout
        yield Cluster(conf.group(1), directory)
    finally:  # also after a failed start: stops whatever of it runs, by PID
        subprocess.run([BASH, str(LOCAL_CLUSTER), "stop"], timeout=120, env=env)


@dataclass
class Job:
    id: str
    log: Path
    run_dir: Path


def submit(cluster: Cluster, folder: Path, corpus: Path, *extra: str) -> Job:
    """sbatch slurm/train.sbatch from ``folder`` (the submit dir: logs and requeue marker)."""
    folder.mkdir(exist_ok=True)
    run_dir = folder / "run"
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={folder}/%j.out", str(SBATCH),
         "--config", str(REPO / "configs" / "ptb.yaml"), "--run-dir", str(run_dir),
         f"data.corpus={corpus}", *JOB_ARGS, *extra],
        capture_output=True, text=True, timeout=60, cwd=folder,
        env=cluster.env({"NPROC_PER_NODE": "1"}))
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    return Job(job_id, folder / f"{job_id}.out", run_dir)


def job_info(cluster: Cluster, job: Job) -> dict[str, str]:
    """``scontrol show job`` as a dict (no accounting daemon here, so no sacct)."""
    line = cluster.run("scontrol", "show", "job", "--oneliner", job.id)
    return dict(re.findall(r"(\w+)=(\S*)", line))


def log_text(job: Job) -> str:
    return job.log.read_text() if job.log.exists() else ""


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def finish(cluster: Cluster, job: Job, timeout: float = 180) -> dict[str, str]:
    """Wait for the job to end for good (a requeued job is PENDING, then RUNNING again)."""
    try:
        wait_until(f"job {job.id} to end",
                   lambda: job_info(cluster, job)["JobState"] in FINAL_STATES, timeout)
    except AssertionError:
        subprocess.run(["scancel", job.id], env=cluster.env(), timeout=60)
        raise AssertionError(f"job {job.id} did not end:\n{log_text(job)}") from None
    return job_info(cluster, job)


def wait_for_training(cluster: Cluster, job: Job) -> None:
    """Until the job has logged training step 50 (the workers' handlers are in)."""
    def training() -> bool:
        assert job_info(cluster, job)["JobState"] in ("PENDING", "RUNNING"), log_text(job)
        return re.search(r"step 50/", log_text(job)) is not None

    wait_until(f"job {job.id} to train", training, 120)


def assert_clean(info: dict[str, str], job: Job, restarts: int) -> str:
    text = log_text(job)
    assert info["JobState"] == "COMPLETED", text
    assert info["ExitCode"] == "0:0", text
    assert info["Restarts"] == str(restarts), text
    assert "Traceback" not in text and "SignalException" not in text, text
    # The only CANCELLED line allowed is SLURM's note on the batch step itself, which the batch
    # script's own `scontrol requeue` ends (a race between its `exit 0` and slurmstepd): it
    # comes after every worker has exited, so nothing is cut short.
    for line in (line for line in text.splitlines() if "CANCELLED" in line):
        assert "DUE TO JOB REQUEUE" in line, text
        assert text.index("dist-w2v: requeueing SLURM job") < text.index(line), text
    assert f"done: outputs in {job.run_dir}" in text
    return text


@pytest.fixture(scope="module")
def straight(cluster: Cluster, shared_small_corpus: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = submit(cluster, tmp_path_factory.mktemp("straight"), shared_small_corpus)
    info = finish(cluster, job)
    assert_clean(info, job, restarts=0)
    return job


def test_a_tiny_job_completes(straight):
    assert (straight.run_dir / "center.npy").is_file()
    assert not list(straight.log.parent.glob(".dist-w2v-*.requeue"))


def test_usr2_checkpoints_requeues_and_resumes_to_the_same_tables(cluster, straight,
                                                                  shared_small_corpus, tmp_path):
    job = submit(cluster, tmp_path / "job", shared_small_corpus)
    wait_for_training(cluster, job)
    cluster.run("scancel", "--signal=USR2", job.id)  # what --signal=USR2@120 does at its time
    text = assert_clean(finish(cluster, job), job, restarts=1)
    step = int(re.search(r"stopped by SIGUSR2 at step (\d+)", text).group(1))
    assert f"dist-w2v: requeueing SLURM job {job.id} at global step {step}" in text
    assert f"resumed from {job.run_dir}/checkpoints/step-{step:09d}.pt" in text
    for table in ("center.npy", "context.npy"):
        np.testing.assert_array_equal(np.load(job.run_dir / table),
                                      np.load(straight.run_dir / table))
    assert not list(job.log.parent.glob(".dist-w2v-*.requeue"))


def test_two_jobs_at_once_on_one_node_both_complete(cluster, shared_small_corpus, tmp_path):
    """Two jobs 3 s apart on one node. With one rendezvous port (29500) for all, the second
    job's torchrun found the first one's store on it, joined it, and failed when the first job
    ended (RendezvousConnectionError); so the second job here runs longer than the first."""
    first = submit(cluster, tmp_path / "first", shared_small_corpus)
    time.sleep(3)
    second = submit(cluster, tmp_path / "second", shared_small_corpus, "train.epochs=60")
    infos = [finish(cluster, first), finish(cluster, second)]
    for info, job in zip(infos, (first, second), strict=True):
        assert_clean(info, job, restarts=0)
    # They ran side by side (SLURM times have a resolution of one second).
    assert infos[1]["StartTime"] < infos[0]["EndTime"], infos


def test_usr2_to_the_batch_shell_does_not_kill_the_job(cluster, shared_small_corpus, tmp_path):
    """``--signal=B:USR2@T``, ``scancel --signal=USR2 --batch``: the shell forwards it to the step
    instead of dying (which failed the job with no requeue)."""
    job = submit(cluster, tmp_path / "job", shared_small_corpus)
    wait_for_training(cluster, job)
    cluster.run("scancel", "--signal=USR2", "--batch", job.id)
    text = assert_clean(finish(cluster, job), job, restarts=1)
    assert "stopped by SIGUSR2" in text
