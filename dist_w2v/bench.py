"""``dist-w2v bench``: our trainer against gensim's Word2Vec on the same corpus, epochs and cores.

Both systems run in their own child process, one after the other, so each peak host RSS is its
own (``getrusage`` in the child: the process itself, or its largest descendant under torchrun).
Speed is center words per second of training time in both: our epochs' center words (tokens
kept after subsampling that have a context), and gensim's *effective* words, the tokens it kept
after subsampling (``train()`` returns ``(effective_words, raw_words)``). Training time excludes
reading the corpus and building the vocabulary in both, and our checkpoint writes and
evaluations. Quality is WordSim353's Spearman on the center vectors (gensim's ``wv``), over the
pairs in the vocabulary; with ``--ttq T`` both are scored after every epoch and the table gives
the training time at which each first reached T.

The workers are ``python -m dist_w2v.bench ours|gensim JSON``; the JSON result is their last
stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_w2v.atomic import write_text_atomically
from dist_w2v.errors import UserError
from dist_w2v.outputs.console import print_out
from dist_w2v.parallel.cores import usable_cores

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS")


@dataclass
class SystemResult:
    """One system's run, as the table reports it."""

    system: str
    setup: str
    ok: bool = True
    note: str = ""
    epochs: int = 0
    words: int = 0
    """Center words (ours) or effective words (gensim) over all epochs."""
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    gpu_peak_mib: float | None = None
    final_loss: float | None = None
    wordsim353: float | None = None
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(epoch, training seconds so far, WordSim353) after each evaluated epoch."""

    @property
    def words_per_s(self) -> float:
        return self.words / self.train_seconds if self.train_seconds > 0 else 0.0

    def time_to(self, threshold: float) -> float | None:
        return next((seconds for _, seconds, score in self.curve if score >= threshold), None)


# -- the parent: options, the two children, the table ------------------------------------------


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config for our trainer (default: the seed's settings)")
    p.add_argument("--world-size", type=int, default=1,
                   help="our ranks; >1 launches torchrun --standalone (gloo on CPU)")
    p.add_argument("--torchrun", action="store_true",
                   help="launch through torchrun even for one rank (process group, DDP, exchange)")
    p.add_argument("--batch-size", type=int, help="global batch (train.batch_size)")
    p.add_argument("--optimizer", help="train.optimizer: adam, sparse_adam or sgd")
    p.add_argument("--lr", type=float, help="train.lr")
    p.add_argument("--exchange", help="dist.grad_exchange: auto, allreduce, allgather or dense")
    p.add_argument("--device", help="train.device: auto, cpu or cuda")
    p.add_argument("--path", help="train.path: fast or padded")
    p.add_argument("--epochs", type=int, help="epochs for both systems (train.epochs)")
    p.add_argument("--max-sentences", type=int, help="first N corpus sentences (0 = all)")
    p.add_argument("--gensim-workers", type=int, default=usable_cores(),
                   help="gensim worker threads (default: all %(default)s cores)")
    p.add_argument("--skip-gensim", action="store_true", help="time our trainer only")
    p.add_argument("--ttq", type=float, metavar="WS353",
                   help="evaluate both after every epoch; report when WordSim353 first reaches it")
    p.add_argument("--out", help="also write the markdown table (machine named) to this file")
    p.add_argument("--work-dir", help="where runs and logs go (default: a new temp folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="more settings for our trainer, e.g. data.subsample_t=1e-4")


def trainer_overrides(args: argparse.Namespace) -> list[str]:
    named = {
        "train.batch_size": args.batch_size, "train.optimizer": args.optimizer,
        "train.lr": args.lr, "dist.grad_exchange": args.exchange, "train.device": args.device,
        "train.path": args.path, "train.epochs": args.epochs,
        "data.max_sentences": args.max_sentences,
    }
    return [f"{k}={v}" for k, v in named.items() if v is not None] + list(args.overrides)


def run_bench(args: argparse.Namespace) -> int:
    from dist_w2v.config import load_config
    from dist_w2v.data.sources import check_data
    from dist_w2v.parallel.env import user_dirs
    from dist_w2v.train.run import check_settings

    if args.world_size < 1:
        raise UserError("--world-size must be >= 1")
    if args.gensim_workers < 1:
        raise UserError("--gensim-workers must be >= 1")
    cfg = load_config(args.config, trainer_overrides(args))
    # What would make both children fail, refused before either starts.
    check_settings(cfg, args.world_size)
    check_data(cfg.data, user_dirs())
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name for the table")
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} not found; create it first")
    # Ours evaluates at the end only, or after every epoch for time to quality.
    cfg.eval.every_epochs = 1 if args.ttq is not None else cfg.train.epochs
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dist-w2v-bench-"))
    config_file = work / "config.yaml"
    try:
        work.mkdir(parents=True, exist_ok=True)
        cfg.save(config_file)
    except OSError as exc:
        raise UserError(f"cannot write to --work-dir {work} ({exc.strerror or exc}); choose a "
                        "writable folder") from None
    machine = describe_machine()
    print_out(f"dist-w2v bench: {machine['line']}; work dir {work}")
    results = [run_child("ours", {"config": str(config_file), "run_dir": str(fresh_dir(work)),
                                  "world_size": args.world_size,
                                  "torchrun": args.torchrun}, work)]
    if not args.skip_gensim:
        results.append(run_child("gensim", {"config": str(config_file),
                                            "workers": args.gensim_workers,
                                            "every_epoch": args.ttq is not None}, work))
    table = format_table(machine, results, args.ttq)
    print_out(table)
    if out is not None:
        try:
            write_text_atomically(out, table + "\n")
        except OSError as exc:
            raise UserError(f"cannot write --out {out} ({exc.strerror or exc}); the table is "
                            "printed above") from None
        print_out(f"wrote {out}")
    return 0 if all(r.ok for r in results if r.system == "dist-w2v") else 1


def fresh_dir(work: Path) -> Path:
    """work/ours, or ours-2, ...: a new run directory, so a reused --work-dir never resumes."""
    candidates = (work / ("ours" if i == 1 else f"ours-{i}") for i in range(1, 10_000))
    return next(path for path in candidates if not path.exists())


def run_child(kind: str, payload: dict[str, Any], work: Path) -> SystemResult:
    log = work / f"{kind}.log"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "dist_w2v.bench", kind, json.dumps(payload)],
                              stdout=subprocess.PIPE, stderr=handle, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        name = "dist-w2v" if kind == "ours" else "gensim"
        return SystemResult(name, "", ok=False,
                            note=f"failed (exit {proc.returncode}: {tail[0][:120]}; see {log})")
    raw = json.loads(lines[-1])
    raw["curve"] = [tuple(point) for point in raw["curve"]]
    return SystemResult(**raw)


def describe_machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = usable_cores()
    gpu = None
    import torch

    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    line = f"CPU {cpu}, {cores} cores; GPU {gpu or 'none'}; torch {torch.__version__}"
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "line": line}


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(machine: dict[str, Any], results: list[SystemResult],
                 ttq: float | None) -> str:
    gensim = next((r for r in results if r.system == "gensim" and r.ok), None)
    head = ["system", "setup", "epochs", "words/s", "vs gensim", "train s", "wall s",
            "peak RSS MiB", "GPU peak MiB", "WS353"]
    if ttq is not None:
        head.append(f"s to WS353 >= {ttq:g}")
    lines = [f"Machine: {machine['line']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.system} | {r.note} |" + " |" * (len(head) - 2))
            continue
        ratio = r.words_per_s / gensim.words_per_s if gensim and gensim.words_per_s else None
        cells = [r.system, r.setup, str(r.epochs), f"{r.words_per_s:,.0f}",
                 _cell(ratio, ".2f") + ("x" if ratio is not None else ""),
                 f"{r.train_seconds:.1f}", f"{r.wall_seconds:.1f}", f"{r.peak_rss_mib:,.0f}",
                 _cell(r.gpu_peak_mib, ",.0f"), _cell(r.wordsim353, ".3f")]
        if ttq is not None:
            cells.append(_cell(r.time_to(ttq), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "words/s: center words (ours) and effective words (gensim: kept after "
              "subsampling) per second of training; peak RSS: the largest process."]
    return "\n".join(lines)


# -- the children --------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak RSS, or its largest finished child's (torchrun's ranks) if larger."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports KiB


def wordsim353_scorer():
    """A function vectors, vocab -> WordSim353 Spearman, or None without gensim's data files."""
    from dist_w2v.outputs.evaluate import UnitTable, benchmarks_if_available, score_similarity

    benchmarks = benchmarks_if_available()
    if benchmarks is None:
        return None
    bench = next(b for b in benchmarks.similarity if b.name == "wordsim353")

    def score(vectors, vocab) -> float:
        return score_similarity(UnitTable(vectors), vocab, bench)["spearman"]

    return score


def ours_worker(payload: dict[str, Any]) -> SystemResult:
    import torch

    from dist_w2v.config import load_config
    from dist_w2v.outputs.metrics import read_metrics
    from dist_w2v.train.run import run_train

    started = time.perf_counter()
    cfg = load_config(payload["config"])
    run_dir = Path(payload["run_dir"])
    world_size = payload["world_size"]
    launched = world_size > 1 or payload["torchrun"]
    if not launched:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
            run_train(payload["config"], [], str(run_dir), None, dict(os.environ))
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world_size}", "-m", "dist_w2v.cli", "train",
                   "--config", payload["config"], "--run-dir", str(run_dir)]
        subprocess.run(command, check=True, stdout=sys.stderr)
    wall = time.perf_counter() - started
    records = read_metrics(run_dir)
    epochs = [r for r in records if r["kind"] == "epoch"]
    seconds_after = {}
    total = 0.0
    for record in epochs:
        total += record["seconds"]
        seconds_after[record["epoch"]] = total
    curve = []
    for record in (r for r in records if r["kind"] == "eval"):
        score = record.get("benchmarks", {}).get("wordsim353", {}).get("spearman")
        if score is not None:
            curve.append((record["epoch"], seconds_after[record["epoch"]], score))
    t = cfg.train
    uses_cuda = torch.cuda.is_available() and t.device in ("auto", "cuda")
    # The ranks' GPU memory is theirs; in-process, this process's allocator saw it all.
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if uses_cuda and not launched else None
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if uses_cuda else "gloo")
    exchange = f"{backend} {cfg.dist.grad_exchange}" if launched else "no DDP"
    return SystemResult(
        system="dist-w2v",
        setup=(f"{t.path}{' compiled' if t.compile else ''} {t.optimizer} lr={t.lr:g} "
               f"B={t.batch_size} W={world_size} "
               f"{'cuda' if uses_cuda else 'cpu'} {exchange}"),
        epochs=len(epochs),
        words=sum(r["center_words"] for r in epochs),
        train_seconds=total,
        wall_seconds=wall,
        peak_rss_mib=peak_rss_mib(),
        gpu_peak_mib=gpu_peak,
        final_loss=epochs[-1]["loss"] if epochs else None,
        wordsim353=curve[-1][2] if curve else None,
        curve=curve,
    )


def gensim_worker(payload: dict[str, Any]) -> SystemResult:
    """gensim's Word2Vec with our data settings: sg=1, same window, negatives, dim, min_count,
    sample; one ``train()`` call per epoch with word2vec's linear alpha decay across them (what
    a single multi-epoch call does), so the vectors can be scored between epochs."""
    started = time.perf_counter()
    setup = f"sg=1 workers={payload['workers']}"
    try:
        from gensim.models import Word2Vec
    except ImportError:
        return SystemResult("gensim", setup, ok=False, note="not installed (pip install gensim)")
    import numpy as np

    from dist_w2v.config import load_config
    from dist_w2v.data.prepared import load_prepared
    from dist_w2v.data.sources import prepared_dir_for
    from dist_w2v.data.vocab import Vocab
    from dist_w2v.parallel.env import user_dirs

    cfg = load_config(payload["config"])
    d = cfg.data
    # The same unk-free sentences our trainer reads (PTB's own <unk> among the unknowns);
    # gensim's min_count then keeps the same words.
    corpus = load_prepared(prepared_dir_for(d, user_dirs(), lambda message: None))
    sentences = corpus.word_sentences()
    model = Word2Vec(vector_size=cfg.model.dim, window=d.max_window, min_count=d.min_count,
                     sample=d.subsample_t, sg=1, negative=d.num_negatives,
                     workers=payload["workers"], seed=cfg.train.seed)
    model.build_vocab(sentences)
    score = wordsim353_scorer()
    epochs = cfg.train.epochs
    alpha, min_alpha = model.alpha, model.min_alpha
    words, train_seconds, curve = 0, 0.0, []
    for epoch in range(epochs):
        start_alpha = alpha - (alpha - min_alpha) * epoch / epochs
        end_alpha = alpha - (alpha - min_alpha) * (epoch + 1) / epochs
        begun = time.perf_counter()
        effective, _raw = model.train(sentences, total_examples=model.corpus_count, epochs=1,
                                      start_alpha=start_alpha, end_alpha=end_alpha)
        train_seconds += time.perf_counter() - begun
        words += effective
        if score is not None and (payload["every_epoch"] or epoch == epochs - 1):
            vocab = Vocab(["<unk>", *model.wv.index_to_key],
                          np.zeros(len(model.wv.index_to_key) + 1, dtype=np.int64))
            vectors = np.vstack([np.zeros((1, model.wv.vector_size), np.float32),
                                 model.wv.vectors])
            curve.append((epoch + 1, train_seconds, score(vectors, vocab)))
    import gensim

    return SystemResult(
        system="gensim", setup=f"{gensim.__version__} {setup}", epochs=epochs, words=words,
        train_seconds=train_seconds, wall_seconds=time.perf_counter() - started,
        peak_rss_mib=peak_rss_mib(), wordsim353=curve[-1][2] if curve else None, curve=curve,
    )


def worker_main(argv: list[str]) -> int:
    kind, payload = argv[0], json.loads(argv[1])
    result = ours_worker(payload) if kind == "ours" else gensim_worker(payload)
    print(json.dumps(asdict(result)), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
