"""A finished run's outputs on disk: the two tables as .npy and the vocabulary as JSON.

Also loads the same from a checkpoint file, so ``similar``, ``eval`` and ``export`` work on a
run directory or on any checkpoint.

The three files are written as a set through :mod:`dist_w2v.atomic`: a failure (a full disk)
leaves the previous outputs as they were. Tables holding NaN or infinity (a diverged run) are
never written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_w2v.atomic import save_npy, write_all
from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError

CENTER_FILE = "center.npy"
CONTEXT_FILE = "context.npy"
VOCAB_FILE = "vocab.json"
# Everything a run directory may hold: `export --out` never writes over one of these.
RUN_FILES = frozenset({CENTER_FILE, CONTEXT_FILE, VOCAB_FILE, "config.yaml", "metrics.jsonl",
                       "loss.png", "checkpoints", "wandb-run-id", "wandb", ".lock"})


@dataclass
class Embeddings:
    center: np.ndarray  # (V, D) float32: the word vectors (a read-only memory map from load_run)
    context: np.ndarray  # (V, D) float32 (likewise)
    vocab: Vocab


def non_finite_table(embeddings: Embeddings) -> str | None:
    """"center table (12 of 1600 values are NaN or infinite)", or None when both are finite."""
    for name, table in (("center", embeddings.center), ("context", embeddings.context)):
        bad = non_finite_count(table)
        if bad:
            return f"{name} table ({bad} of {table.size} values are NaN or infinite)"
    return None


def non_finite_count(table: np.ndarray, block_rows: int = 65_536) -> int:
    """Counted block by block: a memory-mapped 1M-word table is not read into memory whole."""
    return sum(int(block.size - np.isfinite(block).sum())
               for block in (table[start:start + block_rows]
                             for start in range(0, len(table), block_rows)))


def save_outputs(run_dir: Path, embeddings: Embeddings) -> None:
    """center.npy, context.npy and vocab.json, replaced together or not at all."""
    bad = non_finite_table(embeddings)
    if bad is not None:
        raise UserError(
            f"not writing the outputs to {run_dir}: the {bad}; training diverged, lower "
            "train.lr and train again"
        )
    vocab_json = json.dumps(embeddings.vocab.to_dict()).encode("utf-8")
    try:
        write_all([
            (run_dir / CENTER_FILE, lambda out: save_npy(out, embeddings.center)),
            (run_dir / CONTEXT_FILE, lambda out: save_npy(out, embeddings.context)),
            (run_dir / VOCAB_FILE, lambda out: out.write(vocab_json)),
        ])
    except OSError as exc:
        raise UserError(
            f"could not write the outputs to {run_dir} ({exc.strerror or exc}); the previous "
            "outputs and the checkpoints are intact: free disk space, then rerun with "
            "--resume auto"
        ) from None


def load_run(run_dir: Path) -> Embeddings:
    """A finished run's tables and vocabulary, each checked: similar, eval and export index
    them and would fail deep inside (or print nan) on a damaged run directory."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"{run_dir} is a file, not a run directory; pass the run's folder to "
                        "--run-dir, or a checkpoint file to --checkpoint")
    if not (run_dir / CENTER_FILE).is_file():
        raise UserError(
            f"{run_dir} holds no trained embeddings ({CENTER_FILE} missing); "
            "pass the --run-dir of a finished `dist-w2v train`, or --checkpoint FILE"
        )
    center, context = (read_table(run_dir / name) for name in (CENTER_FILE, CONTEXT_FILE))
    vocab = Vocab.load(run_dir / VOCAB_FILE)
    for name, table in ((CENTER_FILE, center), (CONTEXT_FILE, context)):
        problem = table_problem(table, len(vocab), center.shape)
        if problem is not None:
            raise UserError(f"{run_dir / name} {problem}; the run directory is damaged or "
                            "inconsistent, retrain or use a checkpoint")
    embeddings = Embeddings(center, context, vocab)
    bad = non_finite_table(embeddings)
    if bad is not None:  # train never writes such tables (save_outputs): damaged since
        raise UserError(f"{run_dir}: the {bad}; the run directory is damaged, retrain or use a "
                        "checkpoint")
    return embeddings


def read_table(path: Path) -> np.ndarray:
    """A table file, memory-mapped read-only: similar, eval and export read the center table
    block by block, and the context table hardly at all, so a 1M-word run never sits in memory
    twice."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the run directory is incomplete, retrain or use a "
                        "checkpoint")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        raise UserError(f"{path} is corrupt (not a .npy table); retrain or use a "
                        "checkpoint") from None


def table_problem(table: np.ndarray, words: int, center_shape: tuple[int, ...]) -> str | None:
    """Why ``table`` cannot be a run's table of ``words`` rows (the context table's shape must
    also be the center table's), or None. Checked once here: similar, eval and export index
    rows and columns of it and would fail deep inside with an IndexError or a TypeError."""
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        return f"is not a 2-D table of floats (a {table.ndim}-D array of {table.dtype})"
    if table.shape[1] < 1:
        return "has no columns (a table of 0 dimensions)"
    if table.shape[0] != words:
        return f"has {table.shape[0]} rows but the vocabulary {words} words"
    if table.shape != center_shape:
        return (f"is {table.shape[0]} x {table.shape[1]} but {CENTER_FILE} "
                f"{center_shape[0]} x {center_shape[1]}")
    return None


def load_checkpoint_embeddings(path: Path) -> Embeddings:
    # Imported here: reading a checkpoint needs torch, whose import costs a run directory's
    # similar / eval / export about 3 s and 300 MB.
    from dist_w2v.train.checkpoint import read_checkpoint

    payload = read_checkpoint(path, fix="use another checkpoint of the run, or its --run-dir "
                                        "once it has finished")
    model = payload["model"]  # read_checkpoint checked the tables and vocab (check_payload)
    vocab = Vocab.from_dict(payload["vocab"])
    return Embeddings(
        center=model["center.weight"].numpy(), context=model["context.weight"].numpy(), vocab=vocab
    )


def load_embeddings(run_dir: Path | None = None, checkpoint: Path | None = None) -> Embeddings:
    if checkpoint is not None:
        from dist_w2v.train.checkpoint import checkpoint_file

        return load_checkpoint_embeddings(checkpoint_file(
            Path(checkpoint), if_folder="pass a checkpoint file to --checkpoint, or a finished "
            "run's folder to --run-dir", if_missing="pass an existing file to --checkpoint"))
    if run_dir is None:
        raise UserError("give --run-dir DIR or --checkpoint FILE")
    return load_run(Path(run_dir))
