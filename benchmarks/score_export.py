"""Score trained runs the way a user outside this repository would: export the vectors with
``dist-w2v export --format word2vec-text`` and let gensim's own evaluator read and score them.

    python benchmarks/score_export.py RUN_DIR [RUN_DIR ...]

Prints, per run, gensim's WordSim353 Spearman (``KeyedVectors.evaluate_word_pairs`` on the
wordsim353.tsv that ships with gensim: lower-cased, pairs with an unknown word skipped) and the
share of pairs skipped, then the median over the runs. No dist-w2v code scores anything here:
the issue's acceptance asks for an evaluator that is not ours.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def export(run_dir: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "dist_w2v.cli", "export", "--run-dir", str(run_dir),
                    "--format", "word2vec-text", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)


def score(vectors: Path) -> tuple[float, float]:
    from gensim.models import KeyedVectors
    from gensim.test.utils import datapath

    kv = KeyedVectors.load_word2vec_format(str(vectors), binary=False)
    _, spearman, oov_percent = kv.evaluate_word_pairs(datapath("wordsim353.tsv"))
    return float(spearman.statistic), float(oov_percent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    scores = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, run_dir in enumerate(args.run_dirs):
            out = Path(scratch) / f"vectors-{i}.txt"
            export(run_dir, out)
            spearman, oov = score(out)
            scores.append(spearman)
            print(f"{run_dir}: WordSim353 Spearman {spearman:.3f} (gensim's evaluator; "
                  f"{oov:.1f}% of pairs skipped)")
    print(f"median {statistics.median(scores):.3f} over {len(scores)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
