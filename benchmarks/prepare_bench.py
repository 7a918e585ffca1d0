"""`dist-w2v prepare` against gensim's vocabulary scan on the same file and cores.

For FILE, runs back to back, each in a fresh process: ``dist-w2v prepare FILE`` (count, encode
and write) and gensim's ``Word2Vec(min_count=...).build_vocab(corpus_file=FILE)`` (count only;
its scan is single-threaded whatever ``workers`` says). Prints a markdown table: the job's own
seconds and CPU seconds (without interpreter start-up and imports), the whole process's
seconds and CPU seconds (CPU: user + system, what a shared machine's load distorts least),
raw tokens per second and peak RSS, and the ratios::

    python benchmarks/zipf_corpus.py --tokens 50e6 --out /tmp/zipf50m.txt
    python benchmarks/prepare_bench.py /tmp/zipf50m.txt

Compare only numbers from one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs one command and reports its wall time and peak RSS (RUSAGE_CHILDREN of this wrapper
# holds exactly that one child).
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": time.perf_counter() - start, "rc": done.returncode,
                  "rss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime,
                  "stdout": done.stdout, "stderr": done.stderr}))
"""

GENSIM = """
import json, sys, time
from gensim.models import Word2Vec
start, start_cpu = time.perf_counter(), time.process_time()
model = Word2Vec(min_count=int(sys.argv[2]), workers=int(sys.argv[3]))
model.build_vocab(corpus_file=sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "job_cpu": time.process_time() - start_cpu, "vocab": len(model.wv),
                  "raw_tokens": model.corpus_total_words}))
"""


def measured(command: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True,
                            text=True, check=True)
    report = json.loads(result.stdout)
    if report["rc"] != 0:
        sys.exit(f"{' '.join(command)} failed:\n{report['stderr']}")
    return report


def run_ours(path: Path, out: Path, workers: int, min_count: int) -> dict:
    report = measured([sys.executable, "-m", "dist_w2v.cli", "prepare", str(path), "--out",
                       str(out), "--force", "--workers", str(workers),
                       "--min-count", str(min_count)])
    manifest = json.loads((out / "manifest.json").read_text())
    found = re.search(r", ([0-9.]+) s \(([0-9.]+) s CPU\), ", report["stdout"])
    return {"seconds": float(found.group(1)), "job_cpu": float(found.group(2)),
            "wall": report["wall"], "rss_kb": report["rss_kb"], "cpu": report["cpu"],
            "raw_tokens": manifest["counts"]["raw_tokens"],
            "vocab": manifest["counts"]["vocab_size"] - 1}  # <unk> aside, as gensim


def run_gensim(path: Path, workers: int, min_count: int) -> dict:
    report = measured([sys.executable, "-c", GENSIM, str(path), str(min_count), str(workers)])
    return {**json.loads(report["stdout"].strip().splitlines()[-1]), "wall": report["wall"],
            "rss_kb": report["rss_kb"], "cpu": report["cpu"]}


def table(path: Path, workers: int, ours: dict, gensim: dict) -> str:
    rows = ["| tool | job s | job CPU s | process s | process CPU s | M raw tokens/s (job) "
            "| peak RSS MB | vocabulary |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("dist-w2v prepare (count, encode, write)", ours),
                    ("gensim build_vocab(corpus_file) (count)", gensim)):
        rows.append(f"| {name} | {r['seconds']:.1f} | {r['job_cpu']:.1f} | {r['wall']:.1f} | "
                    f"{r['cpu']:.1f} | "
                    f"{r['raw_tokens'] / r['seconds'] / 1e6:.2f} | {r['rss_kb'] / 1024:,.0f} | "
                    f"{r['vocab']:,} |")
    return (f"{path.name}: {ours['raw_tokens']:,} tokens, {path.stat().st_size / 1e6:,.0f} MB, "
            f"{workers} workers\n\n" + "\n".join(rows) +
            f"\n\nspeed-up (job): {gensim['seconds'] / ours['seconds']:.2f}x, "
            f"(job CPU time): {gensim['job_cpu'] / ours['job_cpu']:.2f}x, "
            f"(process): {gensim['wall'] / ours['wall']:.2f}x, "
            f"(process CPU time): {gensim['cpu'] / ours['cpu']:.2f}x\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path, help="whitespace-tokenized text, one sentence per line")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for dist-w2v prepare, workers for gensim (default: cores)")
    p.add_argument("--min-count", type=int, default=10)
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the prepared corpus is written (and removed)")
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="prepare-bench-", dir=args.scratch))
    try:
        ours = run_ours(args.file, out, args.workers, args.min_count)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    gensim = run_gensim(args.file, args.workers, args.min_count)
    print(table(args.file, args.workers, ours, gensim))
    if ours["vocab"] != gensim["vocab"]:
        print(f"note: vocabulary sizes differ ({ours['vocab']:,} vs {gensim['vocab']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
