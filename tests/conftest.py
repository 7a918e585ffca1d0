"""Shared fixtures: where PTB lives, small corpora, and how to run the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_w2v.config import DataConfig, load_config
from dist_w2v.data.examples import Batch, ExampleBuilder
from dist_w2v.data.prepared import PreparedCorpus, load_prepared
from dist_w2v.data.stream import ChunkSource, whole_corpus
from dist_w2v.parallel.env import UserDirs

REPO = Path(__file__).resolve().parents[1]


def ptb_dir() -> Path:
    """$DIST_W2V_DATA, else ../shared/data/ptb beside the repository (as CI lays it out)."""
    env = os.environ.get("DIST_W2V_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "ptb"


@pytest.fixture(scope="session")
def ptb() -> Path:
    path = ptb_dir()
    if not (path / "ptb.train.txt").is_file():
        pytest.fail(f"PTB not found in {path}; "
                    "set DIST_W2V_DATA to the folder holding ptb.train.txt")
    return path


@pytest.fixture
def small_corpus(tmp_path: Path, ptb: Path) -> Path:
    """The first 2,000 PTB sentences as a standalone corpus file."""
    lines = (ptb / "ptb.train.txt").read_text().splitlines()[:2000]
    path = tmp_path / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def shared_small_corpus(tmp_path_factory: pytest.TempPathFactory, ptb: Path) -> Path:
    """small_corpus written once per session, for module-scoped fixtures (reference runs)."""
    lines = (ptb / "ptb.train.txt").read_text().splitlines()[:2000]
    path = tmp_path_factory.mktemp("shared_corpus") / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# torchrun's agent makes a log folder per launch with tempfile.mkdtemp("torchelastic_...") and
# never removes it; launches from tests put theirs (and any other temp file) under pytest's own
# temporary tree, which pytest prunes, instead of /tmp.
TEST_TMPDIR: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def launch_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("launch-tmp")
    TEST_TMPDIR[:] = [path]
    return path


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    env.update({"DIST_W2V_DATA": str(ptb_dir()), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    if TEST_TMPDIR:
        env["TMPDIR"] = str(TEST_TMPDIR[0])
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``dist-w2v ARGS`` in a fresh interpreter, exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "dist_w2v.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=cli_env(env), cwd=cwd or REPO,
    )


def compiled_variants(*overrides: str) -> dict[str, dict[str, int]]:
    """tests/compiled_variants.py in a fresh interpreter: each compiled kernel's variants after
    the trainer's setup and after its training."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "compiled_variants.py"), *overrides],
        capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO / "tests",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


SMOKE = ("train.epochs=1", "train.batch_size=64", "model.dim=16", "data.min_count=5",
         "eval.every_epochs=0", "train.threads=1")


def prepare(data: DataConfig, cache: Path) -> PreparedCorpus:
    """The corpus ``data`` names, prepared into ``cache`` by the trainer's own path."""
    from dist_w2v.data.sources import prepared_dir_for

    dirs = UserDirs(ptb=ptb_dir(), cache=cache)
    return load_prepared(prepared_dir_for(data, dirs, say=lambda message: None))


@pytest.fixture(scope="session")
def prepared_ptb(tmp_path_factory: pytest.TempPathFactory, ptb: Path) -> PreparedCorpus:
    return prepare(DataConfig(dir=str(ptb)), tmp_path_factory.mktemp("cache"))


def one_chunk_examples(corpus: PreparedCorpus, builder, seed: int = 0, epoch: int = 0):
    """A whole-corpus chunk's examples, as the trainer's ChunkSource builds them."""
    return ChunkSource(corpus, builder, seed, True).build(whole_corpus(corpus), epoch)[0]


@pytest.fixture(scope="session")
def ptb_epoch(prepared_ptb):
    """Epoch 0 of full PTB with the seed's settings, and the vocabulary size."""
    cfg = load_config(None, [])
    builder = ExampleBuilder(prepared_ptb.vocab, cfg.data, torch.device("cpu"))
    return one_chunk_examples(prepared_ptb, builder), len(prepared_ptb.vocab)


def ptb_batch(ptb_epoch, size: int, seed: int = 0) -> Batch:
    """``size`` examples of ``ptb_epoch`` drawn at random."""
    examples, _ = ptb_epoch
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return examples.batch(order[:size])


@pytest.fixture
def one_thread():
    """One intra-op thread, as init_distributed sets it for a rank (and restored after): two
    threads on a busy two-core box run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
