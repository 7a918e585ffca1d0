"""A finished run's outputs on disk: the two tables as .npy and the vocabulary as JSON.

Also loads the same from a checkpoint file, so ``similar``, ``eval`` and ``export`` work on a
run directory or on any checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError

CENTER_FILE = "center.npy"
CONTEXT_FILE = "context.npy"
VOCAB_FILE = "vocab.json"


@dataclass
class Embeddings:
    center: np.ndarray  # (V, D) float32: the word vectors (a read-only memory map from load_run)
    context: np.ndarray  # (V, D) float32 (likewise)
    vocab: Vocab


def save_outputs(run_dir: Path, embeddings: Embeddings) -> None:
    np.save(run_dir / CENTER_FILE, embeddings.center)
    np.save(run_dir / CONTEXT_FILE, embeddings.context)
    embeddings.vocab.save(run_dir / VOCAB_FILE)


def load_run(run_dir: Path) -> Embeddings:
    run_dir = Path(run_dir)
    if not (run_dir / CENTER_FILE).is_file():
        raise UserError(
            f"{run_dir} holds no trained embeddings ({CENTER_FILE} missing); "
            "pass the --run-dir of a finished `dist-w2v train`, or --checkpoint FILE"
        )
    try:
        # Memory-mapped, read-only: similar, eval and export read the center table block by
        # block, and the context table not at all, so a 1M-word run never sits in memory twice.
        center = np.load(run_dir / CENTER_FILE, mmap_mode="r")
        context = np.load(run_dir / CONTEXT_FILE, mmap_mode="r")
    except (OSError, ValueError):
        raise UserError(
            f"embeddings in {run_dir} are corrupt; retrain or use a checkpoint"
        ) from None
    vocab = Vocab.load(run_dir / VOCAB_FILE)
    if center.shape[0] != len(vocab):
        raise UserError(
            f"{run_dir}: {CENTER_FILE} has {center.shape[0]} rows but the vocabulary "
            f"{len(vocab)}; the run directory is inconsistent, retrain or use a checkpoint"
        )
    return Embeddings(center, context, vocab)


def load_checkpoint_embeddings(path: Path) -> Embeddings:
    # Imported here: reading a checkpoint needs torch, whose import costs a run directory's
    # similar / eval / export about 3 s and 300 MB.
    from dist_w2v.train.checkpoint import read_checkpoint

    payload = read_checkpoint(path)
    model = payload["model"]
    vocab = Vocab.from_dict(payload["vocab"])
    return Embeddings(
        center=model["center.weight"].numpy(), context=model["context.weight"].numpy(), vocab=vocab
    )


def load_embeddings(run_dir: Path | None = None, checkpoint: Path | None = None) -> Embeddings:
    if checkpoint is not None:
        return load_checkpoint_embeddings(Path(checkpoint))
    if run_dir is None:
        raise UserError("give --run-dir DIR or --checkpoint FILE")
    return load_run(Path(run_dir))
