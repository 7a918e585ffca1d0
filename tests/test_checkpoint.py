"""Checkpoint files: contents, naming and keep-N, bad files, mismatched runs, failed writes.

One real one-epoch run (in this process, world size 1) makes the checkpoints; every test works
on its own copy of that run directory.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from workers import TINY, run, train_command

from dist_w2v.cli import main
from dist_w2v.config import CkptConfig
from dist_w2v.outputs.metrics import read_metrics
from dist_w2v.parallel.env import DistEnv
from dist_w2v.train.checkpoint import Checkpointer, CorruptCheckpoint, read_checkpoint
from dist_w2v.train.run import effective_resume

# 70-80 steps per epoch with a checkpoint every 20: saves at 20, 40, 60 and the epoch end; keep 3.
EVERY = "ckpt.every_steps=20"


def train(*argv: str) -> int:
    """``dist-w2v train`` in this process (the real CLI path), restoring torch's thread count."""
    threads = torch.get_num_threads()
    try:
        return main(["train", "--config", str(REPO / "configs" / "ptb.yaml"), *argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(shared_small_corpus) -> Path:
    """conftest's small_corpus, shared by the module's reference runs."""
    return shared_small_corpus


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train("--run-dir", str(run_dir), f"data.corpus={corpus}", *TINY, EVERY) == 0
    return run_dir


@pytest.fixture(scope="module")
def epoch_end(trained) -> int:
    """The global step of the epoch's end (the stream's step count for this corpus)."""
    (epoch,) = [r for r in read_metrics(trained) if r["kind"] == "epoch"]
    assert 60 < epoch["global_step"] < 80
    return epoch["global_step"]


@pytest.fixture(scope="module")
def kept(epoch_end) -> list[str]:
    return [f"step-{epoch_end:09d}.pt", "step-000000060.pt", "step-000000040.pt"]


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def resume_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(run_dir), f"data.corpus={corpus}", *TINY, EVERY, *extra]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-w2v: error: "), err
    return lines[0]


def test_checkpoint_holds_the_whole_run_state(trained, kept, epoch_end):
    checkpointer = Checkpointer(trained / "checkpoints", CkptConfig(every_steps=20, keep=3),
                                DistEnv())
    assert [p.name for p in checkpointer.checkpoints()] == kept  # newest first, keep 3
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == sorted(kept)

    last = read_checkpoint(trained / "checkpoints" / kept[0])
    assert {"model", "optimizer", "state", "vocab", "config"} <= set(last)
    assert last["state"]["epoch"] == 1 and last["state"]["step"] == 0
    assert last["state"]["global_step"] == epoch_end
    assert [r["epoch"] for r in last["state"]["history"] if r["kind"] == "epoch"] == [1]
    np.testing.assert_array_equal(last["model"]["center.weight"].numpy(),
                                  np.load(trained / "center.npy"))
    assert all("exp_avg" in s for s in last["optimizer"]["state"].values())
    assert len(last["vocab"]["idx_to_token"]) == last["model"]["center.weight"].shape[0]
    assert last["config"]["model"]["dim"] == 16

    middle = read_checkpoint(trained / "checkpoints" / kept[1])["state"]
    assert (middle["epoch"], middle["step"], middle["global_step"]) == (0, 60, 60)


def test_corrupt_and_truncated_files_are_named(run_copy, kept):
    path = run_copy / "checkpoints" / kept[0]
    size = path.stat().st_size
    damages = [
        ("checksum mismatch", lambda: flip_byte(path)),
        ("bad header", lambda: flip_byte(path, offset=0)),
        ("checksum mismatch", lambda: truncate(path, size // 2)),
        ("bad header", lambda: truncate(path, 20)),
    ]
    original = path.read_bytes()
    for reason, damage in damages:
        path.write_bytes(original)
        damage()
        with pytest.raises(CorruptCheckpoint) as excinfo:
            read_checkpoint(path)
        assert str(excinfo.value) == f"checkpoint {path} is corrupt or truncated ({reason})"


def test_cli_reports_a_corrupt_checkpoint_in_one_line(run_copy, corpus, kept):
    path = run_copy / "checkpoints" / kept[0]
    flip_byte(path)
    result = run_cli("train", "--config", "configs/ptb.yaml",
                     *resume_args(corpus, run_copy, "--resume", str(path)))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        f"dist-w2v: error: checkpoint {path} is corrupt or truncated (checksum mismatch); resume "
        "an older checkpoint, or --resume auto, which skips damaged files")
    assert "Traceback" not in result.stdout + result.stderr


def test_similar_reports_a_truncated_checkpoint(run_copy, capsys, kept):
    path = run_copy / "checkpoints" / kept[0]
    truncate(path, path.stat().st_size - 1)
    assert main(["similar", "--checkpoint", str(path), "chip"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"dist-w2v: error: checkpoint {path} is corrupt or truncated (checksum mismatch); use "
        "another checkpoint of the run, or its --run-dir once it has finished")


@pytest.mark.parametrize("override, message", [
    ("data.min_count=6", "was trained on a different vocabulary"),
    ("model.dim=8", "was saved with model.dim=16 but the config says 8; resume with model.dim=16"),
    ("train.seed=1", "was saved with train.seed=0 but the config says 1"),
    ("train.data_seed=1", "was saved with train.data_seed=null but the config says 1; resume "
                          "with train.data_seed=null"),
])
def test_a_checkpoint_of_another_run_is_refused(run_copy, corpus, capsys, override, message, kept):
    assert train(*resume_args(corpus, run_copy, override), "--resume", "auto") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {run_copy / 'checkpoints' / kept[0]} {message}" in line


def test_a_vocabulary_of_the_same_size_is_named_by_its_first_other_word(run_copy, corpus,
                                                                         tmp_path, capsys, kept):
    """Another corpus whose vocabulary has as many words: the message must not read "61 words,
    this corpus gives 61"."""
    words = json.loads((run_copy / "vocab.json").read_text())["idx_to_token"]
    renamed = tmp_path / "renamed.txt"  # one word spelled otherwise: same counts, same size
    renamed.write_text(re.sub(rf"\b{re.escape(words[1])}\b", "zzzrenamed", corpus.read_text()))
    assert train(*resume_args(renamed, run_copy), "--resume", "auto") == 2
    line = one_error_line(capsys.readouterr().err)
    assert (f"was trained on a different vocabulary ({len(words)} words in both, but word 1 is "
            f"{words[1]!r} there and 'zzzrenamed' here)") in line


def test_auto_skips_a_corrupt_newest_checkpoint_and_says_so(trained, run_copy, corpus,
                                                            capsys, kept):
    newest, previous = (run_copy / "checkpoints" / name for name in kept[:2])
    flip_byte(newest)
    assert train(*resume_args(corpus, run_copy), "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest} is corrupt or truncated (checksum mismatch)" in out
    assert f"resumed from {previous} at epoch 1, step 60" in out
    # The bad file is set aside, the epoch is finished again, and exactly as the first time.
    assert (newest.parent / f"{newest.name}.superseded").is_file()
    read_checkpoint(newest)
    np.testing.assert_array_equal(np.load(run_copy / "center.npy"), np.load(trained / "center.npy"))


def test_auto_refuses_when_no_checkpoint_is_valid(run_copy, corpus, capsys, kept):
    for name in kept:
        flip_byte(run_copy / "checkpoints" / name)
    assert train(*resume_args(corpus, run_copy), "--resume", "auto") == 2
    out, err = capsys.readouterr()
    assert f"no valid checkpoint in {run_copy / 'checkpoints'} (3 found, none readable)" in (
        one_error_line(err))
    skipped = [line for line in out.splitlines() if line.startswith("skipping checkpoint")]
    assert [line.endswith("; trying the previous checkpoint") for line in skipped] == [
        True, True, False]  # the oldest has none before it


def test_resuming_an_older_checkpoint_sets_newer_ones_aside(trained, run_copy, corpus,
                                                            capsys, kept):
    """Else a later restart's --resume auto would jump back to the abandoned newer ones."""
    older = run_copy / "checkpoints" / kept[2]
    assert train(*resume_args(corpus, run_copy), "--resume", str(older)) == 0
    assert f"resumed from {older} at epoch 1, step 40" in capsys.readouterr().out
    names = sorted(p.name for p in older.parent.iterdir())
    assert names == sorted([*kept, f"{kept[0]}.superseded", f"{kept[1]}.superseded"])
    np.testing.assert_array_equal(np.load(run_copy / "center.npy"), np.load(trained / "center.npy"))


def test_a_write_that_fails_halfway_keeps_the_previous_checkpoint(run_copy, corpus, tmp_path,
                                                                  kept, epoch_end):
    """RLIMIT_FSIZE makes the kernel refuse the checkpoint's write part-way, as a full disk does."""
    checkpoints = run_copy / "checkpoints"
    limit = (checkpoints / kept[0]).stat().st_size // 2

    def small_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    command = train_command(0, *resume_args(corpus, run_copy, "train.epochs=2"), "--resume",
                            "auto")
    code, out = run(command, tmp_path / "log", preexec_fn=small_file_limit)
    assert code == 2, out
    assert "Traceback" not in out
    failed, kept = checkpoints / "step-000000080.pt", checkpoints / kept[0]
    assert (f"dist-w2v: error: could not write checkpoint {failed} (File too large); "
            f"{kept} is intact") in out
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before  # no temp file left
    assert read_checkpoint(kept)["state"]["global_step"] == epoch_end


def test_a_fresh_run_refuses_a_run_dir_that_holds_checkpoints(run_copy, corpus, capsys):
    assert train(*resume_args(corpus, run_copy)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run_copy / 'checkpoints'} already holds checkpoints; pass --resume auto" in line


def test_restarted_workers_resume_from_the_newest_checkpoint(run_copy, tmp_path):
    checkpointer = Checkpointer(run_copy / "checkpoints", CkptConfig(), DistEnv())
    empty = Checkpointer(tmp_path / "none", CkptConfig(), DistEnv())
    first, restarted = DistEnv(restart_count=0), DistEnv(restart_count=1)
    assert effective_resume(None, restarted, checkpointer) == "auto"
    assert effective_resume(None, restarted, empty) == "auto"  # died before its first save
    # The first attempt's --resume FILE is history once the attempt has saved checkpoints.
    assert effective_resume("older.pt", restarted, checkpointer) == "auto"
    assert effective_resume("older.pt", restarted, empty) == "older.pt"
    assert effective_resume("older.pt", first, checkpointer) == "older.pt"
