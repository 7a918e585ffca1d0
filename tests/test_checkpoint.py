"""Checkpoint files: contents, naming and keep-N, bad files, mismatched runs, failed writes.

One real one-epoch run (in this process, world size 1) makes the checkpoints; every test works
on its own copy of that run directory.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from workers import TINY, run, train_command

from dist_w2v.cli import main
from dist_w2v.config import CkptConfig
from dist_w2v.outputs.metrics import read_metrics
from dist_w2v.parallel.env import DistEnv
from dist_w2v.train.checkpoint import (
    STATE_FIELDS,
    Checkpointer,
    CorruptCheckpoint,
    MalformedCheckpoint,
    read_checkpoint,
    write_checkpoint,
)
from dist_w2v.train.loop import TrainState
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


# -- a checkpoint with a right checksum but a payload that dist-w2v does not write -----------


@dataclasses.dataclass
class Whole:
    """A payload that replaces the checkpoint's whole payload."""

    payload: Any


def rewrite(path: Path, change: Callable[[dict[str, Any]], Any] | Whole) -> None:
    """Write ``path`` again with its payload changed in place by ``change`` (or replaced by a
    Whole one), through the real writer: the checksum is right."""
    payload = read_checkpoint(path)
    if isinstance(change, Whole):
        payload = change.payload
    else:
        change(payload)
    with open(path, "wb") as handle:
        write_checkpoint(handle, payload)


def tables(change: Callable[[torch.Tensor], Any]) -> Callable[[dict[str, Any]], None]:
    def apply(payload: dict[str, Any]) -> None:
        payload["model"] = {name: change(table) for name, table in payload["model"].items()}
    return apply


def first_nan(table: torch.Tensor) -> torch.Tensor:
    table = table.clone()
    table[3, 2] = float("nan")
    return table


MALFORMED = {
    "minimal": (Whole({"model": {}, "state": {}}), "no optimizer, vocab, config"),
    "a list": (Whole([1, 2]), "the payload is a list, not a dict"),
    "a part more": (lambda p: p.update(hook=1), "unknown part hook"),
    "a state field more": (lambda p: p["state"].update(bogus=1), "unknown bogus"),
    "a state field less": (lambda p: p["state"].pop("epoch"), "missing epoch"),
    "state a list": (lambda p: p.update(state=[1, 2]), "state is not a mapping"),
    "state a string": (lambda p: p["state"].update(step="3"), "state step is '3', not a"),
    "no config": (lambda p: p.pop("config"), "no config"),
    "config section a string": (lambda p: p["config"].update(train="x"),
                                "config section train is not a mapping"),
    "narrower tables": (tables(lambda t: t[:, :8].clone()),
                        "config model.dim is 16 but the tables are 8 wide"),
    "1-D tables": (tables(lambda t: t[:, 0].clone()), "center.weight is not a 2-D float32 tensor"),
    "int tables": (tables(lambda t: t.to(torch.int64)), "is not a 2-D float32 tensor"),
    "strings for tables": (tables(lambda t: "a"), "is not a 2-D float32 tensor"),
    "tables of two shapes": (lambda p: p["model"].update(
        {"context.weight": p["model"]["context.weight"][:-1].clone()}), "the tables differ"),
    "a NaN": (tables(first_nan), "center.weight holds 1 of"),
    "an infinity": (tables(lambda t: t / 0), "values that are NaN or infinite"),
    "vocab a string": (lambda p: p.update(vocab="x"), "vocab must hold exactly"),
    "ten words": (lambda p: p["vocab"].update(idx_to_token=p["vocab"]["idx_to_token"][:10],
                                              counts=p["vocab"]["counts"][:10]),
                  "rows but the vocabulary 10 words"),
    "fewer counts": (lambda p: p["vocab"].update(counts=p["vocab"]["counts"][:10]),
                     "words but 10 counts"),
    "param_groups a string": (lambda p: p["optimizer"].update(param_groups="zz"),
                              "optimizer param_groups is not a list of mappings"),
    "a third parameter": (lambda p: p["optimizer"]["param_groups"][0]["params"].append(2),
                          "do not list the 2 tables once each"),
    "moments of another size": (lambda p: p["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(5, 16)), "optimizer state exp_avg does not fit"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_payload_is_refused_where_it_is_read(run_copy, kept, case):
    change, problem = MALFORMED[case]
    path = run_copy / "checkpoints" / kept[0]
    rewrite(path, change)
    with pytest.raises(MalformedCheckpoint) as excinfo:
        read_checkpoint(path, fix="not this advice: the file's own applies")
    message = str(excinfo.value)
    assert message.startswith(f"checkpoint {path} is not a valid dist-w2v checkpoint ("), message
    assert problem in message and "\n" not in message and "not this advice" not in message


def test_state_fields_are_the_train_states():
    """The checkpoint code's list of state fields is TrainState's: a field added to one only
    would refuse every new checkpoint, or let TrainState(**state) fail on resume."""
    fields = {f.name: f.type for f in dataclasses.fields(TrainState)}
    assert {name: kind.__name__ for name, kind in STATE_FIELDS.items()} == {
        name: kind.split("[")[0] for name, kind in fields.items()}


def test_every_loader_refuses_a_malformed_checkpoint_in_one_line(run_copy, corpus, tmp_path,
                                                                 capsys, kept):
    """The probe's crashes: a TypeError on resume, zip() in export, a size mismatch."""
    bad = tmp_path / "bad.pt"
    shutil.copy(run_copy / "checkpoints" / kept[0], bad)
    rewrite(bad, MALFORMED["a state field more"][0])
    out = tmp_path / "vectors.txt"
    commands = [
        ["similar", "--checkpoint", str(bad), "stock"],
        ["export", "--checkpoint", str(bad), "--format", "word2vec-text", "--out", str(out)],
        ["eval", "--checkpoint", str(bad)],
    ]
    for command in commands:
        assert main(command) == 2, command
        assert f"checkpoint {bad} is not a valid dist-w2v checkpoint (state fields" in (
            one_error_line(capsys.readouterr().err))
    assert not out.exists()
    shutil.copy(run_copy / "checkpoints" / kept[0], bad)
    rewrite(bad, MALFORMED["ten words"][0])
    result = run_cli("train", "--config", "configs/ptb.yaml",
                     *resume_args(corpus, tmp_path / "new", "--resume", str(bad)))
    assert result.returncode == 2
    assert "rows but the vocabulary 10 words" in one_error_line(result.stderr)
    assert "Traceback" not in result.stdout + result.stderr


def test_auto_stops_at_a_malformed_newest_checkpoint(run_copy, corpus, capsys, kept):
    """Its checksum is right, so it was written so on purpose: not skipped as a damaged one."""
    newest = run_copy / "checkpoints" / kept[0]
    rewrite(newest, MALFORMED["narrower tables"][0])
    assert train(*resume_args(corpus, run_copy), "--resume", "auto") == 2
    out, err = capsys.readouterr()
    assert f"move it out of {newest.parent} to resume the one before" in one_error_line(err)
    assert "skipping" not in out and "resumed from" not in out


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
