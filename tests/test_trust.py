"""Issue 11, "Trust": files a run can rely on, and runs that cannot trample each other.

Crafted checkpoints run no code; one run per run directory; strict JSON; atomic outputs that a
full disk cannot half-write; no silent overwrite; `train --check`; one error line per launch.
Real CLI processes, real files, real torchrun; each test fails if its feature is removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli_env, run_cli
from test_launch_scripts import BASH, LAUNCH, make_stubs
from workers import TINY, launched, run, train_command

from dist_w2v.cli import main
from dist_w2v.config import load_config
from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError
from dist_w2v.folder_lock import holding
from dist_w2v.outputs.artifacts import Embeddings, save_outputs
from dist_w2v.outputs.evaluate import TrainingEvaluator
from dist_w2v.outputs.metrics import RunLogger
from dist_w2v.train.checkpoint import MAGIC, make_payload, read_checkpoint, write_checkpoint
from dist_w2v.train.lock import run_dir_lock


def newest_checkpoint(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").glob("step-*.pt"))


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", "configs/ptb.yaml", "--run-dir", str(run_dir),
            f"data.corpus={corpus}", *TINY, *extra]


def train_here(*argv: str) -> int:
    """The real CLI in this process (faster than a subprocess), restoring torch's threads."""
    threads = torch.get_num_threads()
    try:
        return main(list(argv))
    finally:
        torch.set_num_threads(threads)


def one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("dist-w2v: error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


def rewritten(path: Path, change) -> None:
    """``path`` written again through the real writer (so its checksum is right), its payload
    first changed in place by ``change``."""
    payload = read_checkpoint(path)
    change(payload)
    with open(path, "wb") as handle:
        write_checkpoint(handle, payload)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(shared_small_corpus) -> Path:
    return shared_small_corpus


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    assert train_here(*train_args(corpus, run_dir)) == 0
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# -- 1. a checkpoint cannot execute code ------------------------------------------------------


class _RunsShell:
    """Unpickles as os.system(command): what a crafted checkpoint would do on a plain load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def craft_checkpoint(path: Path, marker: Path) -> bytes:
    """A file with our MAGIC and a correct SHA-256 whose pickle calls os.system."""
    buffer = io.BytesIO()
    torch.save({"model": {}, "state": {}, "hook": _RunsShell(f"touch {marker}")}, buffer)
    body = buffer.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    return body


def test_the_crafted_payload_would_run_code_on_a_plain_load(tmp_path):
    """The attack is real: torch.load(weights_only=False) of the body runs the command."""
    marker = tmp_path / "marker"
    body = craft_checkpoint(tmp_path / "step-000000999.pt", marker)
    torch.load(io.BytesIO(body), weights_only=False)
    assert marker.exists()


def test_a_crafted_checkpoint_runs_no_code(run_copy, corpus, tmp_path):
    marker = tmp_path / "marker"
    crafted = run_copy / "checkpoints" / "step-000000999.pt"  # the newest: auto picks it
    craft_checkpoint(crafted, marker)
    commands = [
        ("similar", "--checkpoint", str(crafted), "chip"),
        ("export", "--checkpoint", str(crafted), "--format", "npy", "--out",
         str(tmp_path / "v.npy")),
        (*train_args(corpus, run_copy), "--resume", "auto"),
    ]
    for command in commands:
        result = run_cli(*command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        line = one_error_line(result.stderr)
        assert f"checkpoint {crafted} was refused: it asks for posix.system" in line, line
        assert not marker.exists(), command
    assert not (tmp_path / "v.npy").exists()


def test_checkpoints_hold_only_plain_values_and_load_safely(trained):
    newest = newest_checkpoint(trained)
    payload = read_checkpoint(newest)  # weights_only=True inside
    assert payload["state"]["global_step"] == int(newest.stem.split("-")[1]) > 0
    with pytest.raises(TypeError, match=r"payload\['state'\]\['loss'\] is a float64"):
        make_payload({}, {}, {"loss": np.float64(1.0)}, {}, {}, "0" * 64)


# -- 2. one run per run directory -------------------------------------------------------------


def test_a_second_train_on_a_busy_run_dir_is_refused(trained, corpus, tmp_path):
    run_dir = tmp_path / "run"
    with launched([sys.executable, "-m", "dist_w2v.cli", *train_args(corpus, run_dir)],
                  tmp_path / "first.log") as first:
        lock = run_dir / ".lock"
        deadline = time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, "first run never locked"
            time.sleep(0.01)
        # Hold the first run where it is (it would otherwise finish before a second interpreter
        # has imported torch), try the second, then let the first go on.
        first.send_signal(signal.SIGSTOP)
        try:
            second = run_cli(*train_args(corpus, run_dir))
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    assert second.returncode == 2
    line = one_error_line(second.stderr)
    assert f"run directory {run_dir} is in use by PID {first.pid} on host " in line
    # The run that held the directory is exactly a clean run.
    for name in ("center.npy", "context.npy"):
        np.testing.assert_array_equal(np.load(run_dir / name), np.load(trained / name))


def test_a_refused_run_touches_nothing_and_a_killed_holder_leaves_no_lock(run_copy, corpus):
    before = snapshot(run_copy)
    with run_dir_lock(run_copy):  # this test process is the holder
        assert train_here(*train_args(corpus, run_copy), "--resume", "auto") == 2
        assert snapshot(run_copy) == {**before, ".lock": (run_copy / ".lock").read_bytes()}
        held = f"{os.getpid()} "
        assert (run_copy / ".lock").read_text().startswith(held)
    # A holder killed by SIGKILL: the kernel drops the lock with the process.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dist_w2v.train.lock import run_dir_lock\n"
         "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(run_copy)], stdout=subprocess.PIPE, text=True, env=cli_env({"PYTHONPATH": str(REPO)}))
    assert holder.stdout.readline().strip() == "held"
    result = run_cli(*train_args(corpus, run_copy), "--check", "--resume", "auto")
    assert result.returncode == 2 and f"PID {holder.pid}" in result.stderr
    holder.kill()
    holder.wait()
    result = run_cli(*train_args(corpus, run_copy), "--check", "--resume", "auto")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_run_refused_before_writing_leaves_no_run_dir_it_made(tmp_path, corpus):
    """A missing corpus or a bad --resume FILE used to leave new/run/ holding only .lock."""
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_bytes(b"junk")
    new = tmp_path / "new"
    for extra in (["data.corpus=" + str(tmp_path / "missing.txt")],
                  ["--resume", str(not_a_checkpoint)]):
        assert train_here(*train_args(corpus, new / "run"), *extra) == 2
        assert not new.exists(), extra
    # A folder that was there stays, and so does a run dir with anything else in it.
    new.mkdir()
    (new / "notes.txt").write_text("mine")
    assert train_here(*train_args(corpus, new), "--resume", str(not_a_checkpoint)) == 2
    assert sorted(path.name for path in new.iterdir()) == [".lock", "notes.txt"]


def test_a_lock_file_removed_by_its_last_holder_is_not_taken(tmp_path):
    """A run that waited on a lock which its holder then removed with the folder it made would
    hold a lock no one else can see; it is refused instead."""
    run_dir = tmp_path / "new" / "run"
    with run_dir_lock(run_dir):
        stale = os.open(run_dir / ".lock", os.O_RDWR)  # opened before the holder gives up
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="a process that has just removed this folder"):
        with holding(stale, lambda holder: UserError(f"in use by {holder}")):
            pass


# -- 3. strict JSON ---------------------------------------------------------------------------


def no_constants(name: str):
    raise AssertionError(f"non-strict JSON constant {name}")


def test_metrics_jsonl_never_holds_nan_or_infinity(tmp_path):
    logger = RunLogger(tmp_path, stream=io.StringIO(), progress=False)
    logger.log_epoch({"epoch": 1, "global_step": 3, "loss": float("nan"),
                      "loss_cumulative": float("inf"), "center_words_per_s": 1.0, "seconds": 1.0})
    logger.rewrite_history([{"kind": "step", "loss": float("-inf"), "n": np.float32("nan")}])
    logger.log_eval({"epoch": 1, "global_step": 3,
                     "benchmarks": {"x": {"spearman": float("nan"), "pairs": 1, "total": 2}}})
    records = [json.loads(line, parse_constant=no_constants)
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"kind": "step", "loss": None, "n": None}
    assert records[1]["benchmarks"]["x"]["spearman"] is None


def test_divergence(trained, corpus, tmp_path):
    """A finished epoch, then train.lr=1e30 under 2 torchrun ranks: every rank stops, one line
    names the step, the rate and the last good checkpoint (the epoch's); no table is written."""
    run_dir = Path(shutil.copytree(trained, tmp_path / "run"))
    (run_dir / "center.npy").unlink()
    good = newest_checkpoint(run_dir)
    args = train_args(corpus, run_dir, "train.epochs=2", "train.lr=1e30")
    code, out = run(train_command(2, *args[3:], "--resume", "auto"), tmp_path / "log")
    assert code != 0, out
    (line,) = {line for line in out.splitlines() if "training diverged" in line}
    assert "is not finite at step " in line and "(lr " in line, line
    assert f"the last good checkpoint is {good}: lower train.lr" in line, line
    assert not (run_dir / "center.npy").exists()
    assert newest_checkpoint(run_dir) == good
    for record in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(record, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_non_finite_tables_are_never_written_nor_evaluated(run_copy, tmp_path):
    vocab = Vocab.load(run_copy / "vocab.json")
    center = np.load(run_copy / "center.npy")
    center[5, 3] = np.nan
    context = np.load(run_copy / "context.npy")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(UserError, match=r"not writing the outputs .* center table \(1 of"):
        save_outputs(fresh, Embeddings(center, context, vocab))
    assert list(fresh.iterdir()) == []
    np.save(run_copy / "center.npy", center)  # a diverged table that reached the disk anyway
    out = tmp_path / "v.txt"
    for command in (("eval", "--json"), ("similar", "stock"),
                    ("export", "--format", "word2vec-text", "--out", str(out))):
        result = run_cli(command[0], "--run-dir", str(run_copy), *command[1:])
        assert result.returncode == 2 and result.stdout == "", command
        assert "center table (1 of" in one_error_line(result.stderr), command
    assert not out.exists()


def test_a_checkpoint_with_non_finite_tables_is_refused_at_load(run_copy, corpus, tmp_path):
    """Not exported, not searched, and not resumed to be stopped as "diverged" a step later."""
    newest = newest_checkpoint(run_copy)

    def poison(payload) -> None:
        payload["model"]["context.weight"][7, 1] = float("inf")

    rewritten(newest, poison)
    out = tmp_path / "v.txt"
    commands = [
        ("similar", "--checkpoint", str(newest), "stock"),
        ("export", "--checkpoint", str(newest), "--format", "word2vec-text", "--out", str(out)),
        (*train_args(corpus, run_copy, "train.epochs=2"), "--resume", "auto"),
    ]
    for command in commands:
        result = run_cli(*command)
        assert result.returncode == 2, command
        line = one_error_line(result.stderr)
        assert (f"checkpoint {newest} is not a valid dist-w2v checkpoint (context.weight holds 1 "
                "of") in line and "NaN or infinite" in line and "diverged" not in line, line
    assert not out.exists()


# -- 4. atomic outputs, full disks, export that cannot clobber a run ---------------------------


def file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_at_the_outputs_keeps_the_previous_ones(run_copy, corpus, tmp_path):
    """RLIMIT_FSIZE stops writes part-way (EFBIG) as a full disk does: here while a finished
    run's `--resume auto` rewrites center.npy; the outputs it had and the checkpoint stay."""
    rewritten = ("metrics.jsonl", "config.yaml", "loss.png", ".lock")  # by the resume itself
    keep = {k: v for k, v in snapshot(run_copy).items() if k not in rewritten}
    limit = (run_copy / "center.npy").stat().st_size // 2
    command = [sys.executable, "-m", "dist_w2v.cli", *train_args(corpus, run_copy), "--resume",
               "auto"]
    code, out = run(command, tmp_path / "log", preexec_fn=file_size_limit(limit))
    assert code == 2, out
    line = one_error_line(out)
    assert f"could not write the outputs to {run_copy} (File too large)" in line
    after = snapshot(run_copy)
    assert {k: after.get(k) for k in keep} == keep  # tables, vocab, checkpoints
    assert not [k for k in after if k.endswith(".tmp")]


@pytest.mark.parametrize("name", ["center.npy", "config.yaml", "checkpoints/newest"])
def test_export_refuses_to_write_over_a_run_file(run_copy, name):
    target = newest_checkpoint(run_copy) if name == "checkpoints/newest" else run_copy / name
    before = target.read_bytes()
    result = run_cli("export", "--run-dir", str(run_copy), "--format", "npy", "--out",
                     str(target))
    assert result.returncode == 2
    assert f"refusing to write {target}: it is a run's own file" in one_error_line(result.stderr)
    assert target.read_bytes() == before


def test_an_export_that_fails_leaves_the_previous_export(run_copy, tmp_path):
    out = tmp_path / "vectors.txt"
    args = ["export", "--run-dir", str(run_copy), "--format", "word2vec-text", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    result = subprocess.run([sys.executable, "-m", "dist_w2v.cli", *args], capture_output=True,
                            text=True, env=cli_env(), cwd=REPO,
                            preexec_fn=file_size_limit(len(before) // 2))
    assert result.returncode == 2
    assert f"cannot write {out} (File too large)" in one_error_line(result.stderr)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "vectors.txt"]  # no temp file


@pytest.mark.parametrize("in_the_way", ["symlink", "hard link", "fifo"])
def test_a_write_never_goes_through_what_holds_its_temp_name(run_copy, tmp_path, in_the_way):
    """OUT.tmp was opened as it was: a symlink there had its target overwritten (as root, any
    file), a hard link truncated the other name's file, and a FIFO blocked the export."""
    out, temp = tmp_path / "vectors.txt", tmp_path / "vectors.txt.tmp"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if in_the_way == "symlink":
        temp.symlink_to(victim)
    elif in_the_way == "hard link":
        os.link(victim, temp)
    else:
        os.mkfifo(temp)
    result = run_cli("export", "--run-dir", str(run_copy), "--format", "word2vec-text", "--out",
                     str(out))
    assert result.returncode == 2
    assert f"{temp} is in the way and is not a file; remove it" in one_error_line(result.stderr)
    assert victim.read_text() == "precious" and not out.exists()
    assert os.path.lexists(temp)  # not this tool's to remove either
    temp.unlink()
    assert main(["export", "--run-dir", str(run_copy), "--format", "word2vec-text", "--out",
                 str(out)]) == 0
    assert out.read_text().split("\n", 1)[0].endswith(" 16")  # "WORDS DIM", then the rows


def cli_with_stdout(stdout, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dist_w2v.cli", *args], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)


def reader_commands(run_dir: Path, out: Path) -> list[tuple[str, ...]]:
    return [("similar", "--run-dir", str(run_dir), "stock", "-k", "5"),
            ("eval", "--run-dir", str(run_dir)),
            ("export", "--run-dir", str(run_dir), "--format", "word2vec-text", "--out", str(out))]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line(trained, corpus, tmp_path):
    """/dev/full takes no byte, like a full disk behind `> file`: similar, eval and export
    give one line and exit 2 (they gave an OSError traceback, exit 1); a training run's
    console log stops with one warning, and the run finishes (it ended at its first line)."""
    with open("/dev/full", "w") as full:
        for command in reader_commands(trained, tmp_path / "v.txt"):
            proc = cli_with_stdout(full, *command)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, (command, err)
            assert one_error_line(err) == (
                "dist-w2v: error: cannot write the output to stdout (No space left on device); "
                "free space where it goes, or send it elsewhere"), command
        run_dir = tmp_path / "run"
        proc = cli_with_stdout(full, *train_args(corpus, run_dir, "train.epochs=2"))
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err.strip().splitlines() == [
        "dist-w2v: warning: cannot write the log to the console (No space left on device); "
        f"training goes on, and {run_dir / 'metrics.jsonl'} keeps every record"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert (run_dir / "center.npy").is_file()


def test_a_reader_that_leaves_early_is_no_error(trained, tmp_path):
    """`dist-w2v similar ... | head -0`: the pipe closes before the first line; no traceback,
    no error line, exit 0."""
    for command in reader_commands(trained, tmp_path / "v.txt"):
        proc = cli_with_stdout(subprocess.PIPE, *command)
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 0 and err == "", (command, err)


# -- 5. no silent overwrite; config.yaml only after the resume checks -------------------------


def test_finished_outputs_are_replaced_only_with_overwrite(run_copy, corpus, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    before = snapshot(run_copy)
    assert train_here(*train_args(corpus, run_copy)) == 2
    assert "already holds a finished run's outputs (center.npy); pass --overwrite" in \
        one_error_line(capsys.readouterr().err)
    assert snapshot(run_copy).items() - before.items() <= {(".lock", b"")} | {
        (".lock", (run_copy / ".lock").read_bytes())}  # at most the lock line changed
    assert train_here(*train_args(corpus, run_copy, "--overwrite")) == 0


def test_a_refused_resume_leaves_config_yaml_alone(run_copy, corpus, capsys):
    config = (run_copy / "config.yaml").read_bytes()
    assert train_here(*train_args(corpus, run_copy, "model.dim=8"), "--resume", "auto") == 2
    assert "was saved with model.dim=16" in one_error_line(capsys.readouterr().err)
    assert (run_copy / "config.yaml").read_bytes() == config


def test_a_malformed_checkpoint_stops_resume_before_config_yaml_is_written(run_copy, corpus,
                                                                            capsys):
    """The probe's case: a checksum-valid newest checkpoint whose state has a field more was
    read only after config.yaml had been rewritten with the new settings, then crashed."""
    newest = newest_checkpoint(run_copy)
    rewritten(newest, lambda payload: payload["state"].update(bogus=1))
    config = (run_copy / "config.yaml").read_bytes()
    assert b"epochs: 1" in config
    assert train_here(*train_args(corpus, run_copy, "train.epochs=3"), "--resume", "auto") == 2
    assert (f"checkpoint {newest} is not a valid dist-w2v checkpoint (state fields differ from "
            "this version's (unknown bogus))") in one_error_line(capsys.readouterr().err)
    assert (run_copy / "config.yaml").read_bytes() == config


# -- 6. train --check, and one error line per launch ------------------------------------------


def test_check_passes_silently_and_creates_nothing(corpus, tmp_path):
    run_dir = tmp_path / "new"
    result = run_cli(*train_args(corpus, run_dir), "--check")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not run_dir.exists()


@pytest.mark.parametrize("extra, fragment", [
    ((), "already holds checkpoints; pass --resume auto"),
    (("--resume", "auto"), "already holds a finished run's outputs"),
    (("--resume", "auto", "--overwrite", "data.corpus=/nonexistent.txt"),
     "corpus file /nonexistent.txt not found"),
    (("--resume", "auto", "--overwrite", "train.lr=0"), "train.lr must be > 0"),
    (("--resume", "auto", "model.dim=8"), "was saved with model.dim=16 but the config says 8"),
    (("--resume", "auto", "--overwrite", "--world-size", "3"),
     "data.shards=16 must divide by the world size 3"),
    (("--resume", "auto", "--overwrite", "--world-size", "2", "dist.grad_exchange=allreduce",
      "dist.backend=nccl"), "dist.backend=nccl needs CUDA devices"),
    (("--resume", "auto", "--overwrite", "--world-size", "0"), "--world-size must be >= 1"),
    (("--resume", "auto", "--overwrite", "train.cuda_graph=true"),
     "train.cuda_graph needs one CUDA process"),
    (("--resume", "auto", "--overwrite", "train.threads=100000"),
     "train.threads=100000 is more than the "),  # was LLVM's abort, exit 134
])
def test_check_names_the_first_problem(run_copy, corpus, capsys, extra, fragment):
    if extra == ("--resume", "auto"):  # no checkpoint to resume: a fresh start over outputs
        shutil.rmtree(run_copy / "checkpoints")
    before = snapshot(run_copy)
    assert train_here(*train_args(corpus, run_copy), "--check", *extra) == 2
    assert fragment in one_error_line(capsys.readouterr().err)
    assert snapshot(run_copy) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check passes where CUDA is")
def test_check_refuses_cuda_where_there_is_none(corpus, tmp_path, capsys):
    assert train_here(*train_args(corpus, tmp_path / "new"), "--check", "train.device=cuda") == 2
    assert "no CUDA device is visible" in one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check passes where CUDA is")
def test_check_refuses_the_triton_kernel_on_cpu_tables(corpus, tmp_path, capsys):
    assert train_here(*train_args(corpus, tmp_path / "new"), "--check", "train.kernel=triton") == 2
    assert "train.kernel=triton" in one_error_line(capsys.readouterr().err)


def test_check_refuses_a_run_dir_under_a_file(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run"
    assert train_here(*train_args(corpus, run_dir), "--check") == 2
    assert (f"cannot write to run directory {run_dir} (not a folder at {tmp_path / 'file'})"
            in one_error_line(capsys.readouterr().err))


def test_a_config_yaml_of_no_run_is_not_replaced(corpus, tmp_path):
    """`--run-dir` at a folder holding a config.yaml of the user's replaced it (and any
    metrics.jsonl) with exit 0. A crashed run's own config.yaml, and files of other names (a
    log beside the run), are no reason to refuse."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("model: resnet50\nepochs: 90\n")
    (folder / "train.log").write_text("log\n")
    before = snapshot(folder)
    for extra in (("--check",), ()):
        result = run_cli(*train_args(corpus, folder), *extra)
        assert result.returncode == 2, extra
        assert one_error_line(result.stderr) == (
            f"dist-w2v: error: --run-dir {folder} holds a config.yaml of no dist-w2v run, which "
            "a run would replace; move that file, or choose a new or empty folder")
        assert snapshot(folder) == before  # not even a .lock
    load_config(REPO / "configs" / "ptb.yaml").save(folder / "config.yaml")  # a crashed run's
    assert run_cli(*train_args(corpus, folder)).returncode == 0
    assert (folder / "center.npy").is_file() and (folder / "train.log").read_text() == "log\n"


def test_a_file_where_the_checkpoints_go_is_refused_before_training(corpus, tmp_path):
    """It failed at the first checkpoint, an epoch later, advising --resume auto (which failed
    the same way); --check passed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("x\n")
    for extra in (("--check",), ()):
        result = run_cli(*train_args(corpus, run_dir), *extra)
        assert result.returncode == 2, extra
        assert one_error_line(result.stderr) == (
            f"dist-w2v: error: {run_dir / 'checkpoints'} is not a folder, and the run's "
            "checkpoints go there; move it away or choose another --run-dir")
        assert not (run_dir / "metrics.jsonl").exists()


def without_file_permission_override() -> list[str]:
    """A command prefix that drops root's right to read any file (tests run as root here)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        return []
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("unreadable", ["config", "corpus"])
def test_an_unreadable_config_or_corpus_is_one_line(corpus, tmp_path, unreadable):
    """Both were a PermissionError traceback, under --check too (so in the launch scripts)."""
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs" / "ptb.yaml").read_text())
    text = tmp_path / "corpus.txt"
    shutil.copy(corpus, text)
    (config if unreadable == "config" else text).chmod(0)
    args = [*train_args(text, tmp_path / "run"), "--check"]
    args[args.index("--config") + 1] = str(config)
    result = subprocess.run([*without_file_permission_override(), sys.executable, "-m",
                             "dist_w2v.cli", *args], capture_output=True, text=True,
                            env=cli_env(), cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    named = config if unreadable == "config" else text
    what = "config file " if unreadable == "config" else ""
    assert f"cannot read {what}{named} (Permission denied); fix its permissions" in line, line


def test_world_size_is_an_option_of_check_only(corpus, tmp_path, capsys):
    """A run's world size is its launcher's; given to a run, it would be silently ignored."""
    assert train_here(*train_args(corpus, tmp_path / "new"), "--world-size", "2") == 2
    assert "--world-size goes with --check" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_launch_script_checks_once_before_torchrun(run_copy, corpus, tmp_path):
    stubs = make_stubs(tmp_path / "bin", ("torchrun",))
    real = stubs / "dist-w2v"
    real.write_text(f"#!/bin/sh\nexec {sys.executable} -m dist_w2v.cli \"$@\"\n")
    real.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = cli_env({"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "NPROC": "2",
                   "PYTHONPATH": str(REPO)})
    result = subprocess.run([BASH, str(LAUNCH), *train_args(corpus, run_copy)[1:]],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "already holds checkpoints" in one_error_line(result.stderr)
    assert not log.exists()  # torchrun never started


def test_under_torchrun_a_user_error_is_printed_once(tmp_path, launch_tmpdir):
    before = set(launch_tmpdir.glob("torchelastic_*"))
    code, out = run(train_command(2, "--run-dir", str(tmp_path / "r"), "train.lr=-1"),
                    tmp_path / "log")
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("dist-w2v: error:")]
    assert errors == ["dist-w2v: error: config: train.lr must be > 0"], out  # not one per rank
    # torchrun's log folder went to the tests' TMPDIR (pruned by pytest), not to /tmp.
    assert set(launch_tmpdir.glob("torchelastic_*")) - before


# -- 7. smaller points ------------------------------------------------------------------------


def test_empty_corpus_and_non_utf8_config_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="data.corpus is empty"):
        load_config(None, ["data.corpus="])
    config = tmp_path / "latin1.yaml"
    config.write_bytes("train:\n  epochs: 1  # \xe9t\xe9\n".encode("latin-1"))
    result = run_cli("train", "--config", str(config), "--check")
    assert result.returncode == 2
    assert f"config file {config} is not UTF-8 text" in one_error_line(result.stderr)


def test_a_path_of_the_wrong_kind_is_named_as_such(corpus, tmp_path, capsys):
    """A folder where a file belongs, or the reverse, is not reported as 'not found'."""
    folder, a_file = tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    a_file.write_text("x\n")
    run_dir = str(tmp_path / "run")
    cases = [
        (("train", "--config", str(folder), "--check"),
         f"config file {folder} is a folder; pass a YAML file to --config"),
        ((*train_args(corpus, run_dir), "--check", f"data.corpus={folder}"),
         f"data.corpus {folder} is a folder; give one text file, or run `dist-w2v prepare"),
        (("train", "--config", "configs/ptb.yaml", "--run-dir", run_dir, "--check",
          f"data.prepared={a_file}"),
         f"prepared corpus {a_file} is a file, not a folder written by `dist-w2v prepare`"),
        ((*train_args(corpus, run_dir), "--check", "--resume", str(folder)),
         f"checkpoint {folder} is a folder; pass a checkpoint file"),
        (("similar", "--run-dir", str(a_file), "chip"),
         f"{a_file} is a file, not a run directory"),
        (("similar", "--checkpoint", str(folder), "chip"),
         f"checkpoint {folder} is a folder; pass a checkpoint file to --checkpoint"),
        (("export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "npy", "--out",
          str(tmp_path / "x.npy")), f"checkpoint {tmp_path / 'none.pt'} not found"),
    ]
    for argv, fragment in cases:
        assert train_here(*argv) == 2, argv
        assert fragment in one_error_line(capsys.readouterr().err)


def test_missing_probe_words_are_named_once(trained):
    said = []
    vocab = Vocab.load(trained / "vocab.json")
    evaluator = TrainingEvaluator(vocab, ["stock", "zzzqx", "japan", "qqqzz"], 3, said.append)
    evaluator.benchmarks = lambda: None  # neighbours only
    model = torch.nn.Module()
    model.center = torch.nn.Embedding.from_pretrained(torch.from_numpy(
        np.load(trained / "center.npy")))
    evaluator(model, 1, 1)
    evaluator(model, 2, 2)
    missing = [s for s in said if "not in the vocabulary" in s]
    assert missing == ["eval: probe words not in the vocabulary, skipped: zzzqx, qqqzz "
                       "(set eval.probes to words of this corpus)"]


def test_loss_plot_is_titled_with_the_run_name(trained):
    from PIL import Image

    with Image.open(trained / "loss.png") as image:
        assert image.text.get("Title") == "run"
