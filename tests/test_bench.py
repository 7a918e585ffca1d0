"""``dist-w2v bench`` end to end on a small PTB slice: both systems train, the table is written.

Speeds are not asserted (the machine is shared); that each number is there and sane is."""

from __future__ import annotations

import re

import torch
from conftest import run_cli


def test_bench_runs_both_systems_and_writes_the_table(tmp_path):
    out = tmp_path / "bench.md"
    result = run_cli(
        "bench", "--max-sentences", "1500", "--epochs", "2", "--batch-size", "256",
        "--gensim-workers", "1", "--ttq", "0.0", "--out", str(out),
        "--work-dir", str(tmp_path / "work"), "data.min_count=5", "model.dim=16",
        "train.threads=1", timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert table in result.stdout + "\n"
    assert re.search(r"Machine: CPU .+, \d+ cores; GPU ", table)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| dist-w2v") or
            line.startswith("| gensim")}
    assert set(rows) == {"dist-w2v", "gensim"}, table
    ours, gensim = rows["dist-w2v"], rows["gensim"]
    assert ours[1].startswith("fast ") and "B=256 W=1" in ours[1]
    for row in (ours, gensim):
        assert row[2] == "2"  # epochs
        assert float(row[3].replace(",", "")) > 0  # words/s
        assert float(row[7].replace(",", "")) > 50  # peak RSS MiB: a real Python + torch process
        assert -1 <= float(row[9]) <= 1  # WordSim353 Spearman
        assert float(row[10]) >= 0  # time to a WS353 of 0.0: the first epoch
    assert gensim[4] == "1.00x" and ours[4].endswith("x")
    assert (tmp_path / "work" / "ours" / "center.npy").is_file()


def test_bench_rejects_a_bad_setting_in_one_line(tmp_path):
    result = run_cli("bench", "--skip-gensim", "--work-dir", str(tmp_path), "train.path=bmm")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dist-w2v: error: config: train.path must be one of fast, padded (got 'bmm')"
    ]


def test_bench_refuses_what_would_fail_only_after_training(tmp_path):
    """A batch the shards cannot split, settings the device refuses, a corpus that is not
    there, an --out or --work-dir that cannot be written: one line each, before either system
    trains, and no temp work dir left behind."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    cases = [
        (["--batch-size", "100"], "train.batch_size=100 must divide by data.shards=16"),
        (["train.kernel=triton", "train.device=cpu"], "train.kernel=triton runs on CUDA tables"),
        (["train.cuda_graph=true", "train.device=cpu"], "train.cuda_graph needs one CUDA process"),
        (["data.corpus=/nonexistent/corpus.txt"], "corpus file /nonexistent/corpus.txt not found"),
        (["--out", str(tmp_path / "none" / "bench.md")], f"folder {tmp_path / 'none'} not found"),
        (["--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        (["--work-dir", str(a_file)], f"cannot write to --work-dir {a_file}"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "train.device=cuda but no CUDA device is visible"))
    for args, fragment in cases:
        result = run_cli("bench", "--skip-gensim", "--epochs", "1", *args,
                         env={"TMPDIR": str(temp)})
        assert result.returncode == 2, (args, result.stdout[-500:], result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (args, result.stderr[-2000:])
        assert "dist-w2v bench:" not in result.stdout  # refused before any child started
    assert list(temp.iterdir()) == []
