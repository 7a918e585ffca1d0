"""The CLI end to end in fresh interpreters, and its handling of user mistakes."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO, SMOKE, cli_env, run_cli

from dist_w2v import cli
from dist_w2v.outputs.metrics import read_metrics


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
                     "data.max_sentences=3000", *SMOKE, "train.epochs=2")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_writes_metrics_outputs_and_config(trained_run):
    run_dir, result = trained_run
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        assert {"epoch", "loss", "loss_cumulative", "center_words_per_s", "seconds"} <= set(record)
    assert epochs[1]["loss"] < epochs[0]["loss"]  # training lowers the loss
    weighted = sum(r["loss"] * r["center_words"] for r in epochs)
    assert epochs[1]["loss_cumulative"] == pytest.approx(
        weighted / sum(r["center_words"] for r in epochs))
    assert "epoch 2: loss" in result.stdout and "running mean" in result.stdout
    vocab = json.loads((run_dir / "vocab.json").read_text())["idx_to_token"]
    center = np.load(run_dir / "center.npy")
    assert center.shape == (len(vocab), 16)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["data"]["max_sentences"] == 3000


def test_similar_prints_neighbours(trained_run):
    run_dir, _ = trained_run
    result = run_cli("similar", "--run-dir", str(run_dir), "stock", "-k", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("cosine sim=") for line in lines)
    assert not any(line.endswith(": stock") for line in lines)


def _assert_one_line_error(result, fragment):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dist-w2v: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_unknown_word(trained_run):
    run_dir, _ = trained_run
    _assert_one_line_error(run_cli("similar", "--run-dir", str(run_dir), "qwertyuiop"),
                           "unknown word 'qwertyuiop'")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.corpus=/nonexistent/corpus.txt"], "corpus file /nonexistent/corpus.txt not found"),
        (["train.bogus=1"], "unknown key 'train.bogus'"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["data.max_window=0"], "data.max_window must be in [1, 10,000] (got 0)"),
    ],
)
def test_train_user_mistakes(tmp_path, overrides, fragment):
    result = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(tmp_path / "r"),
                     *overrides)
    _assert_one_line_error(result, fragment)


@pytest.mark.parametrize(
    "content, fragment",
    [("", "is empty"), ("the cat sat\non the mat\n", "no word occurs at least 10 times"),
     # No sentence of two words; the vocabulary, <unk> and "a", is smaller than the compiled
     # kernels' warm-up example (3 rows), which once read past the tables:
     ("a\n" * 50, "the corpus gives no training examples in epoch 1")],
    ids=["empty", "all-rare", "one-word-sentences"],
)
def test_train_bad_corpus(tmp_path, content, fragment):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(content)
    result = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(tmp_path / "r"),
                     f"data.corpus={corpus}")
    _assert_one_line_error(result, fragment)


@pytest.mark.parametrize("argv, start, end", [
    (["train", "--config", "configs/ptb.yaml", "--batch-size", "1"],
     "train: unrecognized arguments: --batch-size (settings are key=value: "
     "train.batch_size=VALUE)", "see `dist-w2v train --help`"),
    (["train", "--config", "configs/ptb.yaml", "--chek"], "train: unrecognized arguments: "
     "--chek", "see `dist-w2v train --help`"),
    (["train"], "train: the following arguments are required: --config",
     "see `dist-w2v train --help`"),
    (["similar", "--run-dir", "r", "-k", "abc", "chip"], "similar: argument -k: invalid int",
     "see `dist-w2v similar --help`"),
    (["export", "--run-dir", "r", "--format", "csv", "--out", "x"],
     "export: argument --format: invalid choice", "see `dist-w2v export --help`"),
    # An empty path (an unset shell variable) meant the current folder, or the default run dir.
    (["train", "--config", "configs/ptb.yaml", "--run-dir", ""],
     "train: argument --run-dir: is empty; give a path", "see `dist-w2v train --help`"),
    (["train", "--config", ""], "train: argument --config: is empty",
     "see `dist-w2v train --help`"),
    (["train", "--config", "configs/ptb.yaml", "--resume", " "],
     "train: argument --resume: is empty", "see `dist-w2v train --help`"),
    (["export", "--run-dir", "r", "--format", "npy", "--out", ""],
     "export: argument --out: is empty", "see `dist-w2v export --help`"),
    (["similar", "--checkpoint", "", "chip"], "similar: argument --checkpoint: is empty",
     "see `dist-w2v similar --help`"),
    (["prepare", "a.txt", "", "--out", "o"], "prepare: argument INPUT: is empty",
     "see `dist-w2v prepare --help`"),
])
def test_command_line_mistakes_are_one_line(argv, start, end):
    """Not argparse's usage dump: the one error line every other user mistake gets (the middle
    is argparse's own wording, which varies between Python versions)."""
    result = run_cli(*argv)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"dist-w2v: error: {start}")
    assert result.stderr.endswith(f"; {end}\n") and result.stderr.count("\n") == 1


def test_missing_config_file(tmp_path):
    _assert_one_line_error(run_cli("train", "--config", str(tmp_path / "none.yaml")), "not found")


def test_similar_on_a_directory_without_a_run(tmp_path):
    _assert_one_line_error(run_cli("similar", "--run-dir", str(tmp_path), "stock"),
                           "holds no trained embeddings")


def test_max_steps_stops_the_run_and_still_writes_its_outputs(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    result = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
                     f"data.corpus={small_corpus}", *SMOKE, "train.epochs=3", "train.max_steps=7",
                     "log.every_steps=1")
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    assert max(r["global_step"] for r in records) == 7
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch["complete"] is False and epoch["center_words"] == 7 * 64
    assert (run_dir / "center.npy").is_file()


def test_ctrl_c_outside_train_does_not_speak_of_checkpoints(tmp_path, monkeypatch, capsys):
    from dist_w2v.data import prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "prepare", interrupted)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    assert cli.main(["prepare", str(corpus), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "dist-w2v: interrupted"


def test_a_ctrl_c_that_numba_turned_into_a_system_error_is_an_interrupt(monkeypatch, capsys):
    """Ctrl-C inside a numba-compiled function surfaces as "SystemError: CPUDispatcher(...)
    returned a result with an exception set", the KeyboardInterrupt as its context; it printed
    a traceback and exited 1, about every other Ctrl-C of a training."""
    def interrupted_in_numba(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemError("CPUDispatcher(<function _forward>) returned a result with an "
                              "exception set") from None

    monkeypatch.setattr(cli, "cmd_similar", interrupted_in_numba)
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["similar", "--run-dir", "x", "chip"]) == 130
    assert capsys.readouterr().err == "dist-w2v: interrupted\n"

    def a_real_system_error(args):
        raise SystemError("a bug, not an interrupt")

    monkeypatch.setattr(cli, "cmd_similar", a_real_system_error)
    with pytest.raises(SystemError, match="a bug"):
        cli.main(["similar", "--run-dir", "x", "chip"])


def test_a_setting_too_large_for_memory_is_one_line(tmp_path):
    """model.dim=10**9 asks the allocator for 27 TB: torch's RuntimeError was a traceback."""
    result = run_cli("train", "--config", "configs/ptb-quick.yaml", "--run-dir",
                     str(tmp_path / "run"), "train.threads=1", "model.dim=1000000000")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dist-w2v: error: out of memory (") and "lower model.dim" in line


def test_a_full_disk_at_metrics_jsonl_is_one_line_and_leaves_whole_lines(tmp_path, ptb):
    """RLIMIT_FSIZE stops a write part-way (EFBIG), as a full disk does, here while a training
    appends its step records: it was a traceback, then a second one from the loss plot reading
    the half-written line."""
    corpus = tmp_path / "corpus"
    prepared = run_cli("prepare", str(ptb / "ptb.train.txt"), "--out", str(corpus),
                       "--max-sentences", "3000", "--min-count", "5")
    assert prepared.returncode == 0, prepared.stderr
    run_dir = tmp_path / "run"
    limit = 8192  # above config.yaml, far below the first checkpoint (at the epoch's end)

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "dist_w2v.cli", "train", "--config", "configs/ptb-quick.yaml",
         "--run-dir", str(run_dir), f"data.prepared={corpus}", "train.threads=1",
         "train.batch_size=64", "log.every_steps=1", "eval.every_epochs=0"],
        capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO,
        preexec_fn=file_size_limit)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = run_dir / "metrics.jsonl"
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"dist-w2v: error: cannot write {metrics} (File too large); free space")
    lines = metrics.read_text().splitlines()
    assert len(lines) > 10 and all(json.loads(line)["kind"] == "step" for line in lines)
