"""Scale benchmark: prepare and train on synthetic Zipf corpora of growing size.

For every size: generate the corpus (benchmarks/zipf_corpus.py), `dist-w2v prepare` it, then
train a bounded number of steps (train.max_steps) on 1 process and on 2 gloo ranks under
torchrun. Reports prepare tokens/s and peak RSS, training center words/s and peak RSS per
process, as a markdown table. What it shows: memory and speed follow the chunk size and the
table size, not the corpus length.

    python benchmarks/scale.py --sizes 10M 100M 1B --workdir /tmp/scale

Peak RSS is the largest resident set of any one process of the command (the children's
``ru_maxrss``, measured per command in a fresh interpreter so that earlier commands do not
count). Corpora, prepared folders and runs go under --workdir (about 11 GB at 1B tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("--config", "configs/ptb.yaml", "train.batch_size=4096", "train.optimizer=sgd",
         "train.lr=3000", "train.lr_min=10", "train.epochs=1", "eval.every_epochs=0",
         "log.every_steps=50")


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``command`` in a fresh interpreter that reports its children's peak RSS; returns
    (seconds, peak RSS in GB) and fails loudly when the command fails."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.call(sys.argv[1:]); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss, rc)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, **(env or {})})
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or lines[-1].split()[-1] != "0":
        sys.exit(f"failed: {' '.join(command)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    seconds, rss_kb, _ = lines[-1].split()
    return float(seconds), int(rss_kb) / 2**20


def training_rate(run_dir: Path) -> tuple[float, int]:
    """Center words/s over the logged windows after the first (which includes start-up), and
    the steps taken."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    rates = [r["center_words_per_s"] for r in steps[1:]] or [steps[0]["center_words_per_s"]]
    return sum(rates) / len(rates), steps[-1]["global_step"]


def run_size(tokens: int, args: argparse.Namespace) -> list[dict]:
    work = Path(args.workdir)
    corpus = work / f"zipf-{tokens}.txt"
    prepared = work / f"zipf-{tokens}.prepared"
    if not corpus.exists():
        subprocess.run([sys.executable, "benchmarks/zipf_corpus.py", "--tokens", str(tokens),
                        "--vocab", str(args.vocab), "--out", str(corpus)], check=True, cwd=REPO)
    seconds, rss = measured(["dist-w2v", "prepare", str(corpus), "--out", str(prepared), "--force"])
    rows = [{"tokens": tokens, "what": "prepare", "procs": 1, "seconds": seconds,
             "rate": tokens / seconds, "rss_gb": rss}]
    for procs in (1, 2):
        run_dir = work / f"run-{tokens}-{procs}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        train = ["-m", "dist_w2v.cli", "train", *TRAIN, f"data.prepared={prepared}",
                 f"train.max_steps={args.steps}", "--run-dir", str(run_dir)]
        if procs == 1:
            command = [sys.executable, *train]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={procs}", *train, "train.threads=1"]
        seconds, rss = measured(command, {"WANDB_MODE": "disabled"})
        rate, steps = training_rate(run_dir)
        rows.append({"tokens": tokens, "what": "train", "procs": procs, "seconds": seconds,
                     "rate": rate, "rss_gb": rss, "steps": steps})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus tokens | step | processes | seconds | tokens/s or center words/s | "
             "peak RSS per process (GB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']:,} | {r['what']} | {r['procs']} | {r['seconds']:.1f} | "
                     f"{r['rate'] / 1e6:.2f}M | {r['rss_gb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M", "1B"])
    parser.add_argument("--vocab", type=int, default=2_000_000,
                        help="Zipf vocabulary (1M+ words reach count 10 at 1B tokens)")
    parser.add_argument("--steps", type=int, default=300, help="train.max_steps per run")
    parser.add_argument("--workdir", default="/tmp/dist-w2v-scale")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        rows += run_size(parse_size(size), args)
        print(table(rows), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
