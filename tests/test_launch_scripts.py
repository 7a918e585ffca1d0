"""launch/train.sh and slurm/train.sbatch, run with recording stubs of srun, scontrol, scancel,
torchrun and nvidia-smi on PATH; and the sbatch line run for real (stub srun executes it) under
SIGUSR2. tests/test_slurm.py runs the sbatch script under a real SLURM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, cli_env, free_port

BASH = shutil.which("bash") or "/bin/bash"
LAUNCH = REPO / "launch" / "train.sh"
SBATCH = REPO / "slurm" / "train.sbatch"

# Each stub appends its argv as one JSON line to $STUB_LOG. scontrol prints $STUB_HOSTS for
# `show hostnames`; nvidia-smi lists $STUB_GPUS GPUs (each with a MIG line, which must not
# count), or fails like a machine without a driver when STUB_GPUS is unset.
STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print(os.environ["STUB_HOSTS"].replace(",", "\\n"))
if name == "nvidia-smi":
    if "STUB_GPUS" not in os.environ:
        sys.exit("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    for i in range(int(os.environ["STUB_GPUS"])):
        print(f"GPU {{i}}: NVIDIA H100 80GB HBM3 (UUID: GPU-{{i}})")
        print(f"  MIG 1g.10gb     Device  0: (UUID: MIG-{{i}})")
if name == "srun" and "STUB_MARKER_STEP" in os.environ:
    # A run that SIGUSR2 stopped: rank 0 leaves its global step for the batch script.
    with open(os.environ["DIST_W2V_REQUEUE_MARKER"], "w") as marker:
        marker.write(os.environ["STUB_MARKER_STEP"] + "\\n")
if name == "srun" and os.environ.get("STUB_SRUN_EXEC"):
    # Run the task command here, as the one task of a one-node step: drop srun's own options.
    command = sys.argv[1:]
    while command[0].startswith("--"):
        command.pop(0)
    os.execvp(command[0], command)
"""


def make_stubs(stub_dir: Path, names: tuple[str, ...]) -> Path:
    """Stubs of ``names`` in ``stub_dir``, beside the one real tool the scripts use (rm)."""
    stub_dir.mkdir()
    for name in names:
        path = stub_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    (stub_dir / "rm").symlink_to(shutil.which("rm") or "/bin/rm")
    return stub_dir


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    return make_stubs(tmp_path / "bin", ("srun", "scontrol", "scancel", "torchrun", "nvidia-smi",
                                         "dist-w2v"))


def run_script_result(script: Path, args: list[str], stub_dir: Path,
                      **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a launch script with only the stubs on PATH; its result and the commands it ran."""
    log = stub_dir.parent / "calls.jsonl"
    log.unlink(missing_ok=True)
    result = subprocess.run([BASH, str(script), *args], capture_output=True, text=True,
                            timeout=30, cwd=REPO,
                            env={"PATH": str(stub_dir), "STUB_LOG": str(log), **env})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def run_script(script: Path, args: list[str], stub_dir: Path, **env: str) -> list[list[str]]:
    """Run a launch script that must succeed; return the commands it ran."""
    result, calls = run_script_result(script, args, stub_dir, **env)
    assert result.returncode == 0, result.stderr
    return calls


TRAIN_ARGS = ["--config", "configs/ptb.yaml", "--run-dir", "runs/my run", "train.epochs=2"]


def torchrun_line(nproc: int) -> list[str]:
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dist_w2v.cli", "train", *TRAIN_ARGS]


@pytest.mark.parametrize(
    ("env", "nproc"),
    [
        ({}, 2),  # no driver: a CPU box, 2 processes
        ({"STUB_GPUS": "4"}, 4),  # every GPU the driver lists
        ({"STUB_GPUS": "4", "CUDA_VISIBLE_DEVICES": "1,3"}, 2),  # only the visible ones
        ({"STUB_GPUS": "4", "CUDA_VISIBLE_DEVICES": ""}, 2),  # none visible: CPU
        ({"STUB_GPUS": "8", "NPROC": "3"}, 3),  # the knob wins
    ],
)
def test_launch_script_runs_torchrun_with_one_process_per_visible_gpu(stubs, env, nproc):
    calls = run_script(LAUNCH, TRAIN_ARGS, stubs, **env)
    assert calls[-1] == torchrun_line(nproc)
    # Checked once, first, as for the run's number of processes.
    assert calls[-2] == ["dist-w2v", "train", "--check", "--world-size", str(nproc), *TRAIN_ARGS]
    assert [c[0] for c in calls[:-2]] in ([], ["nvidia-smi"])


@pytest.mark.parametrize("nproc", ["abc", "0", "-2", "2.5"])
def test_launch_script_refuses_a_bad_process_count_in_one_line(stubs, nproc):
    """torchrun would answer with a traceback (ValueError, AssertionError)."""
    result, calls = run_script_result(LAUNCH, TRAIN_ARGS, stubs, NPROC=nproc)
    assert result.returncode == 2 and calls == []
    assert result.stderr == (f"dist-w2v: error: NPROC={nproc} must be a whole number of "
                             "processes >= 1 (or unset: one per GPU, else 2)\n")


def sbatch_directives() -> list[str]:
    return re.findall(r"^#SBATCH\s+(\S+)", SBATCH.read_text(), flags=re.M)


def test_sbatch_header_asks_for_warning_signal_requeue_and_per_job_logs():
    directives = sbatch_directives()
    for wanted in ("--signal=USR2@120", "--requeue", "--open-mode=append", "--output=%x-%j.out",
                   "--ntasks-per-node=1"):
        assert wanted in directives
    node_counts = [d for d in directives if d.startswith(("--nodes", "-N"))]
    assert not node_counts, "the node count is the user's choice at submission"
    assert "RANDOM" not in SBATCH.read_text()


# The task's launcher: torchrun runs with SIGUSR2 blocked (not ignored: see the sbatch header).
BLOCK_USR2 = ["python3", "-c", "import os, signal, sys\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
              "os.execvp(sys.argv[1], sys.argv[1:])"]


def srun_line(nodes: int, nproc: int, head: str, job_id: str, port: int) -> list[str]:
    return [
        "srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *BLOCK_USR2,
        "torchrun", f"--nnodes={nodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint={head}:{port}", f"--rdzv_id={job_id}", "--max-restarts=3",
        "-m", "dist_w2v.cli", "train", "--resume", "auto", *TRAIN_ARGS,
    ]


def sbatch_check(world_size: int) -> list[str]:
    """The job checks config, data and run dir once, before srun, for all nodes' processes
    (a requeued attempt resumes)."""
    return ["dist-w2v", "train", "--check", "--world-size", str(world_size), "--resume", "auto",
            *TRAIN_ARGS]


def test_sbatch_one_node_takes_gpu_count_from_the_driver(stubs):
    calls = run_script(SBATCH, TRAIN_ARGS, stubs, SLURM_JOB_ID="777", SLURM_NNODES="1",
                       SLURM_JOB_NODELIST="gpu01", STUB_HOSTS="gpu01", STUB_GPUS="8")
    assert calls == [
        ["nvidia-smi", "-L"],
        sbatch_check(8),
        ["scontrol", "show", "hostnames", "gpu01"],
        srun_line(nodes=1, nproc=8, head="gpu01", job_id="777", port=15777),
    ]


def test_sbatch_two_nodes_rendezvous_at_the_first_host(stubs):
    calls = run_script(SBATCH, TRAIN_ARGS, stubs, SLURM_JOB_ID="4242", SLURM_NNODES="2",
                       SLURM_JOB_NODELIST="node[07-08]", STUB_HOSTS="node07,node08",
                       SLURM_GPUS_ON_NODE="4")
    assert calls == [
        sbatch_check(8),
        ["scontrol", "show", "hostnames", "node[07-08]"],
        srun_line(nodes=2, nproc=4, head="node07", job_id="4242", port=19242),
    ]


@pytest.mark.parametrize("knob, value", [
    ("NPROC_PER_NODE", "2x"), ("NPROC_PER_NODE", "08"), ("NPROC_PER_NODE", "abc"),
    ("NPROC_PER_NODE", "0"), ("RDZV_PORT", "99999"), ("RDZV_PORT", "abc"),
    ("MAX_RESTARTS", "abc"), ("MIN_PROGRESS_STEPS", "x1"),
])
def test_sbatch_refuses_a_bad_knob_before_anything_runs(stubs, knob, value):
    """"2x" was bash's "value too great for base", then srun and torchrun started anyway;
    "abc" an "unbound variable"; MIN_PROGRESS_STEPS failed only after the run, leaving the
    requeue marker behind."""
    result, calls = run_script_result(SBATCH, TRAIN_ARGS, stubs, SLURM_JOB_ID="9",
                                      SLURM_NNODES="1", SLURM_JOB_NODELIST="n1",
                                      STUB_HOSTS="n1", SLURM_GPUS_ON_NODE="2", **{knob: value})
    assert result.returncode == 2 and calls == [], result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dist-w2v: error: {knob}={value} must be a "
                                                   "whole number from "), lines


def test_sbatch_rendezvous_port_differs_between_jobs_and_can_be_set(stubs):
    """Jobs sharing a node must not share the c10d port (29500 for all made the second fail)."""
    env = {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "STUB_HOSTS": "n1"}

    def endpoint(**extra: str) -> str:
        calls = run_script(SBATCH, TRAIN_ARGS, stubs, **env, **extra)
        return next(a for a in calls[-1] if a.startswith("--rdzv_endpoint="))

    ports = [endpoint(SLURM_JOB_ID=str(job)) for job in (41, 42, 29999)]
    assert ports == [f"--rdzv_endpoint=n1:{port}" for port in (15041, 15042, 29999)]
    assert endpoint(SLURM_JOB_ID="41", RDZV_PORT="29400") == "--rdzv_endpoint=n1:29400"


# -- requeue after the step: the batch script requeues, and not an attempt that made no progress --


def marker_job(tmp_path: Path, stubs: Path, step: str, previous: str | None = None):
    """The sbatch script with a stub srun that stops like SIGUSR2 would at global step ``step``;
    ``previous`` is the marker left by the attempt before (the step it stopped at)."""
    marker = tmp_path / ".dist-w2v-55.requeue"
    if previous is not None:
        marker.write_text(previous + "\n")
    result, calls = run_script_result(
        SBATCH, TRAIN_ARGS, stubs, SLURM_JOB_ID="55", SLURM_NNODES="1",
        SLURM_JOB_NODELIST="n1", STUB_HOSTS="n1", SLURM_SUBMIT_DIR=str(tmp_path),
        STUB_MARKER_STEP=step)
    return result, calls, marker


def test_sbatch_requeues_once_the_step_has_ended(tmp_path, stubs):
    result, calls, marker = marker_job(tmp_path, stubs, step="120")
    assert result.returncode == 0, result.stderr
    assert [c[0] for c in calls[-2:]] == ["srun", "scontrol"]  # the requeue comes after srun
    assert calls[-1] == ["scontrol", "requeue", "55"]
    assert calls[-2][-len(TRAIN_ARGS):] == TRAIN_ARGS
    assert marker.read_text() == "120\n"  # kept: the next attempt compares its progress with it
    assert "dist-w2v: warning: this attempt ran only" in result.stderr  # seconds, not minutes

    # The requeued attempt got much further: requeued again.
    result, calls, marker = marker_job(tmp_path, stubs, step="900", previous="120")
    assert result.returncode == 0, result.stderr
    assert calls[-1] == ["scontrol", "requeue", "55"]

    # A trainer that could not tell its step: requeued without the progress check.
    result, calls, marker = marker_job(tmp_path, stubs, step="unknown", previous="900")
    assert result.returncode == 0, result.stderr
    assert calls[-1] == ["scontrol", "requeue", "55"]


def test_sbatch_refuses_to_requeue_an_attempt_without_progress(tmp_path, stubs):
    """A --time too short for start-up plus the USR2 warning: each attempt stops at its first
    stop check (10 steps); looping through requeues would never finish."""
    result, calls, marker = marker_job(tmp_path, stubs, step="130", previous="120")
    assert result.returncode == 1
    assert ["scontrol", "requeue", "55"] not in calls
    lines = [line for line in result.stderr.splitlines() if "not requeueing" in line]
    assert len(lines) == 1 and "10 steps (global step 120 to 130)" in lines[0], result.stderr
    assert not marker.exists()


def test_sbatch_finished_or_failed_run_is_not_requeued(tmp_path, stubs):
    marker = tmp_path / ".dist-w2v-55.requeue"
    marker.write_text("120\n")  # left by the attempt before: this one resumed and finished
    result, calls = run_script_result(
        SBATCH, TRAIN_ARGS, stubs, SLURM_JOB_ID="55", SLURM_NNODES="1",
        SLURM_JOB_NODELIST="n1", STUB_HOSTS="n1", SLURM_SUBMIT_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert calls[-1][0] == "srun"
    assert not marker.exists()


@pytest.mark.parametrize("slurm_env, missing", [
    ({}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "5"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1"}, "SLURM_NNODES"),
])
def test_sbatch_outside_slurm_names_the_problem(stubs, slurm_env, missing):
    result = subprocess.run([BASH, str(SBATCH)], capture_output=True, text=True, timeout=30,
                            env={"PATH": str(stubs), "STUB_LOG": os.devnull, **slurm_env})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"dist-w2v: error: {missing} is not set: this is a SLURM batch script; submit it with "
        "`sbatch slurm/train.sbatch ...` (for local GPUs use launch/train.sh)"]


# -- the sbatch line for real: SIGUSR2 checkpoints, requeues, and torchrun survives ---------------


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time): the start time tells a pid from a later reuse of it."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (workers too: they sit in sessions of their own)."""
    table = process_table()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent:
                found[child] = started
                todo.append(child)
    return found


def kill_if_same(processes: dict[int, str]) -> None:
    table = process_table()
    for pid, started in processes.items():
        if pid in table and table[pid][1] == started:
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the job ended before it was signalled"
        assert time.monotonic() < deadline, "timed out waiting for the job"
        time.sleep(0.1)


def workers_of_torchrun(pid: int) -> list[int]:
    """The worker processes below ``pid``: children of a process whose command is torchrun."""
    found = []
    for child in descendants(pid):
        try:
            parent = int((Path("/proc") / str(child) / "stat").read_text().rsplit(")", 1)[1]
                         .split()[1])
            if b"torchrun" in (Path("/proc") / str(parent) / "cmdline").read_bytes():
                found.append(child)
        except (OSError, ValueError):
            continue
    return found


def test_sbatch_line_checkpoints_and_requeues_on_usr2_even_during_start_up(tmp_path,
                                                                           small_corpus):
    """SIGUSR2 to every process of the step while the workers are still starting (importing
    torch, before their handler exists): torchrun lives on (it has USR2 blocked), the workers
    get the signal once their handler is in (blocked, not ignored: an ignored one is lost and
    the run would go on for its 100 epochs), rank 0 saves and leaves the requeue marker, and
    the batch script requeues after srun returned."""
    stubs = make_stubs(tmp_path / "bin", ("srun", "scontrol", "scancel"))  # the real torchrun
    run_dir = tmp_path / "run"
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "job.out"
    env = cli_env({
        "PATH": f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(log), "STUB_HOSTS": "localhost", "STUB_SRUN_EXEC": "1",
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port()), "MAX_RESTARTS": "0",
    })
    args = ["--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
            f"data.corpus={small_corpus}", *SMOKE, "train.epochs=100", "log.every_steps=5"]
    seen: dict[int, str] = {}
    with open(out, "w") as stdout:
        job = subprocess.Popen([BASH, str(SBATCH), *args], stdout=stdout,
                               stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        wait_for(lambda: len(workers_of_torchrun(job.pid)) == 2, 120, job)
        started = "world size" in out.read_text()
        # What SLURM does at --signal time: USR2 to every process of the step, not the batch shell.
        seen = descendants(job.pid)
        for pid in seen:
            os.kill(pid, signal.SIGUSR2)
        returncode = job.wait(timeout=90)
    finally:
        if job.poll() is None:
            seen.update(descendants(job.pid))
            job.kill()
        job.wait()
        kill_if_same(seen)  # workers orphaned by a torchrun that died
    text = out.read_text()
    assert not started, "the workers were already training when signalled"
    assert returncode == 0, text  # torchrun lived through USR2 and its workers exited cleanly
    step = int(re.search(r"stopped by SIGUSR2 at step (\d+)", text).group(1))
    assert "SLURM job 4242 will be requeued by its batch script" in text
    assert (tmp_path / ".dist-w2v-4242.requeue").read_text() == f"{step}\n"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[-1] == ["scontrol", "requeue", "4242"]  # by the batch script, after srun
    assert [c for c in calls if c[:2] == ["scontrol", "requeue"]] == [calls[-1]]
    assert (run_dir / "checkpoints" / f"step-{step:09d}.pt").is_file()
    assert not (run_dir / "center.npy").exists()  # stopped, not finished
