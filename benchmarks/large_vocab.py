"""`similar`, `eval` and `export` on a 1M-word table: seconds and peak memory of each command.

    python benchmarks/large_vocab.py [--rows 1000000] [--dim 300] [--ptb DIR] [--keep DIR]

Writes a run directory as ``outputs/artifacts.save_outputs`` lays it out (center.npy,
context.npy, vocab.json) holding a random float32 table: 1,000,000 x 300 is 1.2 GB per table, so
about 2.4 GB of /tmp. The vocabulary starts with PTB's words (``--ptb``, default
$DIST_W2V_DATA), so the benchmarks cover what they cover on PTB (217 WordSim pairs, 3,013
analogy questions), then filler words up to ``--rows``. Each command runs as its own process and
is measured by ``os.wait4``: wall seconds and peak resident memory (file pages of the
memory-mapped table included). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dist_w2v.config import DataConfig
from dist_w2v.data.prepared import load_prepared
from dist_w2v.data.sources import prepared_dir_for
from dist_w2v.data.vocab import UNK, Vocab
from dist_w2v.outputs.artifacts import CENTER_FILE, CONTEXT_FILE, VOCAB_FILE
from dist_w2v.parallel.env import user_dirs

ROWS_PER_WRITE = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="vocabulary size V")
    p.add_argument("--dim", type=int, default=300, help="vector size D")
    p.add_argument("--ptb", default=os.environ.get("DIST_W2V_DATA"),
                   help="PTB folder whose words head the vocabulary (default $DIST_W2V_DATA)")
    p.add_argument("--keep", help="write the run directory here and keep it (default: a temp dir)")
    return p.parse_args(argv)


def synthetic_words(rows: int, ptb: str | None) -> list[str]:
    """<unk>, PTB's vocabulary when given, then ``w0000123`` fillers: ``rows`` words in all."""
    if ptb:
        prepared = prepared_dir_for(DataConfig(dir=ptb), user_dirs(), lambda message: None)
        words = load_prepared(prepared).vocab.idx_to_token
    else:
        words = [UNK]
    words = words[:rows]
    return words + [f"w{i:07d}" for i in range(len(words), rows)]


def write_table(path: Path, rows: int, dim: int, seed: int) -> None:
    """A random (rows, dim) float32 .npy, generated and written a block at a time."""
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, ROWS_PER_WRITE):
        stop = min(start + ROWS_PER_WRITE, rows)
        table[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    table.flush()
    del table


def write_run(run_dir: Path, rows: int, dim: int, ptb: str | None) -> None:
    words = synthetic_words(rows, ptb)
    Vocab(words, np.arange(len(words), 0, -1, dtype=np.int64)).save(run_dir / VOCAB_FILE)
    write_table(run_dir / CENTER_FILE, rows, dim, seed=0)
    write_table(run_dir / CONTEXT_FILE, rows, dim, seed=1)


def measure(args: list[str], log: Path, run_dir: Path) -> dict[str, object]:
    """Run ``dist-w2v ARGS`` with output to ``log``; its exit code, seconds and peak RSS (MB)."""
    command = [sys.executable, "-m", "dist_w2v.cli", *args]
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": "dist-w2v " + " ".join(args).replace(str(run_dir), "RUN"),
        "code": process.returncode,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def markdown(rows: list[dict[str, object]], table_mb: float) -> str:
    lines = ["| command | exit | seconds | peak RSS (MB) | peak RSS / table |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['command']}` | {r['code']} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / table_mb:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="large-vocab-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        write_run(run_dir, args.rows, args.dim, args.ptb)
        print(f"wrote a {args.rows} x {args.dim} run in {run_dir} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        source = ["--run-dir", str(run_dir)]
        commands = [
            ["similar", *source, "stock", "japan", "w0999999", "-k", "5"],
            ["eval", *source, "--json"],
            ["export", *source, "--format", "word2vec-binary", "--out", str(run_dir / "v.bin")],
        ]
        results = []
        for command in commands:
            results.append(measure(command, run_dir / f"{command[0]}.log", run_dir))
            print(f"{results[-1]}\n{(run_dir / f'{command[0]}.log').read_text()[-600:]}",
                  flush=True)
        table_mb = args.rows * args.dim * 4 / 2**20
        print(f"\n{args.rows} x {args.dim} float32 center table: {table_mb:.0f} MB\n")
        print(markdown(results, table_mb))
        return max(int(r["code"]) for r in results)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
