"""The README's quality table: dist-w2v against gensim on the same data and hyperparameters.

    python benchmarks/quality.py --config configs/ptb.yaml --seeds 0 1 2
    python benchmarks/quality.py --config configs/ptb.yaml --seeds 0 --max-sentences 3000 \\
        train.epochs=1                                   # a quick smoke run on a slice

For every seed it trains with the real CLI (``dist-w2v train``, plain or ``--nproc N`` under
torchrun), scores the run with ``dist-w2v eval --json``, then trains gensim's Word2Vec with the
config's hyperparameters on the same unk-free sentences and scores its vectors with the same
evaluation code. One markdown table goes to stdout (and ``table.md`` in --out-dir).

Columns: the last epoch's training loss (dist-w2v only; gensim does not report a comparable
one); the loss on ptb.valid.txt, computed for both systems the same way (the d2l loss of the
final center/context tables on one sampled epoch of the valid split, with the training
vocabulary's subsampling and noise tables and a fixed seed); WordSim353 and SimLex-999
Spearman with pairs covered; Google-analogy 3CosAdd accuracy with questions covered; chip's
nearest neighbours.

gensim's settings: sg=1, hs=0, negative=data.num_negatives, window=data.max_window (gensim also
draws the effective window uniformly from 1..window), vector_size=model.dim,
min_count=data.min_count, sample=data.subsample_t, epochs=train.epochs, ns_exponent=0.75.
alpha=0.025 decaying linearly to min_alpha=0.0001: word2vec's own default for skip-gram (and
gensim's). dist-w2v's lr is an Adam step size and does not transfer to SGD, so gensim gets the
rate its authors tuned for this model rather than a number copied across optimizers. One
difference remains by design: gensim subsamples with word2vec's formula
((sqrt(f/t) + 1) t/f), dist-w2v with d2l's sqrt(t/f).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_w2v.config import Config, load_config
from dist_w2v.data.examples import ExampleBuilder
from dist_w2v.data.prepared import load_prepared
from dist_w2v.data.sources import prepared_dir_for, ptb_split_path
from dist_w2v.data.vocab import Vocab
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.outputs.evaluate import evaluation_report, json_safe, load_benchmarks
from dist_w2v.parallel.env import user_dirs

PROBES = ["chip"]
VALID_SEED = 20_240_601
VALID_BATCH = 4096
GENSIM_ALPHA, GENSIM_MIN_ALPHA = 0.025, 0.0001


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ptb.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-sentences", type=int, default=0, help="train on a slice (0 = all)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/quality"))
    p.add_argument("--overwrite", action="store_true", help="replace run dirs left in --out-dir")
    p.add_argument("--nproc", type=int, default=0, help="train under torchrun with N processes")
    p.add_argument("--gensim-workers", type=int, default=2)
    p.add_argument("--skip-gensim", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to dist-w2v train")
    return p.parse_args(argv)


# -- dist-w2v through its CLI --------------------------------------------------------------------


def train_ours(args: argparse.Namespace, seed: int, overrides: list[str]) -> Path:
    run_dir = args.out_dir / f"dist-w2v-seed{seed}"
    if run_dir.exists():
        if not args.overwrite:
            sys.exit(f"quality.py: {run_dir} exists; pass --overwrite or another --out-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cli = ["-m", "dist_w2v.cli", "train", "--config", args.config, "--run-dir", str(run_dir),
           f"train.seed={seed}", *overrides]
    if args.nproc:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               *cli]
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.call([sys.executable, *cli], stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"quality.py: training seed {seed} failed (exit {code}); see {log.name}")
    return run_dir


def eval_ours(run_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "dist_w2v.cli", "eval", "--run-dir", str(run_dir), "--json",
         "--probes", ",".join(PROBES)],
        capture_output=True, text=True,
    )
    # Exit 2 with a report: a probe word is not in a small run's vocabulary, which is no failure.
    if out.returncode not in (0, 2) or not out.stdout.startswith("{"):
        sys.exit(f"quality.py: eval of {run_dir} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def training_summary(run_dir: Path) -> dict[str, float]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in metrics if r["kind"] == "epoch"]
    return {"train_loss": epochs[-1]["loss"], "seconds": sum(r["seconds"] for r in epochs)}


# -- gensim on the same sentences -------------------------------------------------------------


def unk_free_sentences(cfg: Config) -> tuple[list[list[str]], Vocab]:
    """The training sentences with every out-of-vocabulary token (and <unk>) removed."""
    corpus = load_prepared(prepared_dir_for(cfg.data, user_dirs(), print))
    return corpus.word_sentences(), corpus.vocab


def train_gensim(cfg: Config, sentences: list[list[str]], seed: int, workers: int):
    from gensim.models import Word2Vec

    return Word2Vec(
        sentences=sentences, sg=1, hs=0, negative=cfg.data.num_negatives,
        window=cfg.data.max_window, vector_size=cfg.model.dim, min_count=cfg.data.min_count,
        sample=cfg.data.subsample_t, ns_exponent=0.75, alpha=GENSIM_ALPHA,
        min_alpha=GENSIM_MIN_ALPHA, epochs=cfg.train.epochs, workers=workers, seed=seed,
    )


def in_vocab_order(keys: dict[str, int], table: np.ndarray, vocab: Vocab) -> np.ndarray:
    """gensim's rows re-ordered to dist-w2v's vocabulary; <unk> and any missing word get 0."""
    out = np.zeros((len(vocab), table.shape[1]), dtype=np.float32)
    for i, word in enumerate(vocab.idx_to_token[1:], start=1):
        if word in keys:
            out[i] = table[keys[word]]
    return out


# -- the same held-out loss for both ------------------------------------------------------------


def encode(path: Path, vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """A small text file's known tokens (int32) and each token's sentence number."""
    ids = [[vocab[w] for w in line.split()] for line in path.read_text().splitlines()]
    ids = [[i for i in s if i != 0] for s in ids]
    tokens = torch.tensor([i for s in ids for i in s], dtype=torch.int32)
    sentences = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(s) for s in ids]))
    return tokens, sentences


def valid_loss(center: np.ndarray, context: np.ndarray, vocab: Vocab, cfg: Config) -> float:
    """Mean per-center d2l loss of the tables on one sampled epoch of ptb.valid.txt."""
    tokens, sentences = encode(ptb_split_path(cfg.data, user_dirs(), "valid"), vocab)
    builder = ExampleBuilder(vocab, cfg.data, torch.device("cpu"))
    examples = builder.build(tokens, sentences, torch.Generator().manual_seed(VALID_SEED))
    model = SkipGram(len(vocab), center.shape[1])
    model.center.weight.data = torch.from_numpy(center)
    model.context.weight.data = torch.from_numpy(context)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), VALID_BATCH):
            batch = examples.batch(torch.arange(start, min(start + VALID_BATCH, len(examples))))
            total += float(model(batch.centers, batch.contexts_negatives, batch.num_contexts,
                                 batch.num_negatives).sum())
    return total / len(examples)


# -- the table ----------------------------------------------------------------------------------


def row(system: str, seed: int, report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {"system": system, "seed": seed, **extra, "benchmarks": report["benchmarks"],
            "chip": report["neighbours"].get("chip")}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| system | seed | train loss (last epoch) | valid loss | WordSim353 (pairs) "
        "| SimLex-999 (pairs) | analogy acc. (questions) | chip's neighbours | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["benchmarks"]
        ws, sl, an = b["wordsim353"], b["simlex999"], b["analogy"]
        chip = ", ".join(f"{w} {s:.3f}" for w, s in r["chip"]) if r["chip"] else "(not in vocab)"
        lines.append(
            f"| {r['system']} | {r['seed']} | {fmt(r.get('train_loss'), '.4f')} "
            f"| {fmt(r['valid_loss'], '.4f')} "
            f"| {fmt(ws['spearman'], '.3f')} ({ws['pairs']}/{ws['total']}) "
            f"| {fmt(sl['spearman'], '.3f')} ({sl['pairs']}/{sl['total']}) "
            f"| {fmt(an['accuracy'], '.1%')} ({an['questions']}/{an['total']}) "
            f"| {chip} | {fmt(r['seconds'], '.1f')} |"
        )
    for system in dict.fromkeys(r["system"] for r in rows):
        scores = [r["benchmarks"]["wordsim353"]["spearman"] for r in rows if r["system"] == system]
        lines.append(f"\n{system}: WordSim353 {seed_summary(scores)}: "
                     f"{', '.join(f'{s:.3f}' for s in scores)}")
    return "\n".join(lines)


def seed_summary(scores: list[float]) -> str:
    """Median, and mean with its standard error: on PTB one seed's WordSim353 varies by about
    0.02 (tuning.md, "How much three seeds can tell"), so settings are compared on the mean of
    many seeds, never on one median of three."""
    text = f"median {statistics.median(scores):.3f} over {len(scores)} seed(s)"
    if len(scores) > 1:
        error = statistics.stdev(scores) / len(scores) ** 0.5
        text += f", mean {statistics.mean(scores):.3f} ± {error:.3f} (standard error)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.max_sentences:
        overrides.append(f"data.max_sentences={args.max_sentences}")
    cfg = load_config(args.config, overrides)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    benchmarks = load_benchmarks()
    rows = []
    for seed in args.seeds:
        run_dir = train_ours(args, seed, overrides)
        report = eval_ours(run_dir)
        vocab = Vocab.load(run_dir / "vocab.json")
        tables = [np.load(run_dir / name) for name in ("center.npy", "context.npy")]
        rows.append(row("dist-w2v", seed, report, {**training_summary(run_dir),
                                                   "valid_loss": valid_loss(*tables, vocab, cfg)}))
        print(f"seed {seed}: dist-w2v done ({run_dir})", file=sys.stderr)
    if not args.skip_gensim:
        sentences, vocab = unk_free_sentences(cfg)
        for seed in args.seeds:
            started = time.perf_counter()
            model = train_gensim(cfg, sentences, seed, args.gensim_workers)
            seconds = time.perf_counter() - started
            keys = model.wv.key_to_index
            if len(keys) != len(vocab) - 1:
                print(f"quality.py: gensim kept {len(keys)} words, dist-w2v {len(vocab) - 1}; "
                      "missing rows are zero", file=sys.stderr)
            center = in_vocab_order(keys, model.wv.vectors, vocab)
            context = in_vocab_order(keys, model.syn1neg, vocab)
            report = evaluation_report(center, vocab, benchmarks, PROBES, 3)
            rows.append(row("gensim", seed, report,
                            {"seconds": seconds, "valid_loss": valid_loss(center, context,
                                                                           vocab, cfg)}))
            print(f"seed {seed}: gensim done", file=sys.stderr)
    table = markdown(rows)
    (args.out_dir / "table.md").write_text(table + "\n")
    (args.out_dir / "rows.json").write_text(json.dumps(json_safe(rows), indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
