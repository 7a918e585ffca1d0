"""Exact resume and torchrun restarts, with real processes.

Two epochs straight must equal one epoch + ``--resume auto`` + one epoch, and a run killed in
the middle of an epoch and resumed must equal the straight run too, at world size 1 and 2.
Every run shares one small corpus and small dimensions, so each takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO
from workers import TINY, epoch_losses, max_table_diff, metric_keys, run, train_command

from dist_w2v.cli import main
from dist_w2v.outputs.metrics import read_metrics

TOLERANCE = 1e-6
# 70-80 steps per epoch: with a checkpoint every 30 steps, a crash at global step 100 (in epoch
# 2) leaves step-000000090.pt, in the middle of epoch 2, as the newest.
EVERY = "ckpt.every_steps=30"
KILL_AT = 100
NEWEST_BEFORE_KILL = "step-000000090.pt"


@pytest.fixture(scope="module")
def corpus(shared_small_corpus) -> Path:
    """conftest's small_corpus, shared by the module's reference runs."""
    return shared_small_corpus


@pytest.fixture
def one_thread():
    """In-process runs set torch's thread count; give the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(run_dir), f"data.corpus={corpus}", *TINY, *extra]


def train_in_process(*argv: str) -> int:
    return main(["train", "--config", str(REPO / "configs" / "ptb.yaml"), *argv])


@pytest.fixture(scope="module")
def straight_2proc(corpus, tmp_path_factory) -> Path:
    """The reference for world size 2: two epochs under torchrun, no interruption."""
    run_dir = tmp_path_factory.mktemp("straight2")
    code, out = run(train_command(2, *args(corpus, run_dir, "train.epochs=2")), run_dir / "log")
    assert code == 0, out
    return run_dir


def assert_same_run(resumed: Path, straight: Path) -> None:
    assert max_table_diff(resumed, straight) <= TOLERANCE
    assert metric_keys(resumed) == metric_keys(straight)  # nothing logged twice or lost
    assert epoch_losses(resumed) == pytest.approx(epoch_losses(straight), rel=1e-9)


def test_resume_is_exact_in_one_process(corpus, tmp_path, one_thread):
    straight, split, killed = tmp_path / "straight", tmp_path / "split", tmp_path / "killed"
    assert train_in_process(*args(corpus, straight, "train.epochs=2")) == 0

    # At an epoch boundary: 1 epoch, then --resume auto for the second.
    assert train_in_process(*args(corpus, split, "train.epochs=1")) == 0
    assert train_in_process(*args(corpus, split, "train.epochs=2"), "--resume", "auto") == 0
    assert_same_run(split, straight)

    # Mid-epoch: a crash (debug.fail_at_step exits at once) after a step checkpoint.
    code, out = run(train_command(0, *args(corpus, killed, "train.epochs=2", EVERY,
                                          f"debug.fail_at_step={KILL_AT}")), tmp_path / "log")
    assert code == 17, out
    assert (killed / "checkpoints" / NEWEST_BEFORE_KILL).is_file()
    # Outside torchrun every run is a "first attempt", so the resume leaves the switch out.
    assert train_in_process(*args(corpus, killed, "train.epochs=2", EVERY),
                            "--resume", "auto") == 0
    assert_same_run(killed, straight)


def test_resume_and_restart_are_exact_under_torchrun(corpus, straight_2proc, tmp_path):
    """Two processes: one epoch, then ``--resume auto`` for the second, during which rank 1
    crashes mid-epoch on the first attempt and torchrun (--max-restarts=1) restarts the group.

    That is a resume at an epoch boundary (by hand) and one in the middle of an epoch (by the
    restarted workers, on their own) in one run, to keep torchrun start-ups few; the result
    must equal the straight run's.
    """
    run_dir = tmp_path / "run"
    code, out = run(train_command(2, *args(corpus, run_dir, "train.epochs=1")), tmp_path / "log1")
    assert code == 0, out

    command = train_command(2, *args(corpus, run_dir, "train.epochs=2", EVERY,
                                      f"debug.fail_at_step={KILL_AT}", "debug.fail_rank=1"),
                            "--resume", "auto", torchrun_args=["--max-restarts=1"])
    code, out = run(command, tmp_path / "log2")
    assert code == 0, out
    (first,) = [r for r in read_metrics(run_dir) if r["kind"] == "epoch" and r["epoch"] == 1]
    end = first["global_step"]
    assert 70 < end < 90
    assert f"step-{end:09d}.pt at epoch 2, step 0" in out  # by hand, at the epoch boundary
    assert f"rank 1 exits at step {KILL_AT}" in out
    assert f"{NEWEST_BEFORE_KILL} at epoch 2, step {90 - end}" in out  # by the restarted workers
    assert_same_run(run_dir, straight_2proc)


@pytest.mark.parametrize("rule", [
    ("train.optimizer=rowwise_adagrad", "train.lr=0.05", "train.warmup=0.2"),
    ("train.optimizer=sgd", "train.lr=50", "train.lr_min=1", "train.max_row_step=0.05",
     "train.warmup=0.2"),
])
def test_large_batch_rules_resume_exactly_mid_epoch(corpus, tmp_path, one_thread, rule):
    """Row-wise Adagrad's accumulators and the warm-up/decay schedule survive a crash."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_in_process(*args(corpus, straight, "train.epochs=2", *rule)) == 0
    code, out = run(train_command(0, *args(corpus, killed, "train.epochs=2", EVERY, *rule,
                                          f"debug.fail_at_step={KILL_AT}")), tmp_path / "log")
    assert code == 17, out
    assert train_in_process(*args(corpus, killed, "train.epochs=2", EVERY, *rule),
                            "--resume", "auto") == 0
    assert_same_run(killed, straight)


def test_a_step_record_after_a_resume_says_how_many_steps_it_covers(corpus, tmp_path,
                                                                    one_thread):
    """Records every 10 steps, a checkpoint at step 25, a crash at 40: the record at step 30
    of the resumed run holds steps 26-30 only, and says so (its loss is those 5 steps')."""
    run_dir = tmp_path / "run"
    code, out = run(train_command(0, *args(corpus, run_dir, "ckpt.every_steps=25",
                                          "debug.fail_at_step=40")), tmp_path / "log")
    assert code == 17, out
    assert train_in_process(*args(corpus, run_dir, "ckpt.every_steps=25"), "--resume",
                            "auto") == 0
    covered = {r["global_step"]: r["window_steps"] for r in read_metrics(run_dir)
               if r["kind"] == "step"}
    assert covered[20] == 10 and covered[30] == 5 and covered[40] == 10
