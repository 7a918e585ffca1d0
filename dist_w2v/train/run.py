"""``dist-w2v train`` end to end: config, process group, run directory, trainer, teardown.

Everything that can refuse a run is checked before anything is written to the run directory:
the lock (one run per directory), checkpoints without ``--resume``, finished outputs without
``--overwrite``, the data source, and a resumed checkpoint's fit to the config. Only then is
``config.yaml`` written. ``dist-w2v train --check`` runs the same checks and stops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from dist_w2v.config import Config, load_config
from dist_w2v.data.prepared import PreparedCorpus, load_prepared
from dist_w2v.data.sources import check_data, prepared_dir_for
from dist_w2v.data.stream import check_shards
from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError
from dist_w2v.model.fast_path import resolve_kernel
from dist_w2v.outputs.artifacts import CENTER_FILE
from dist_w2v.outputs.evaluate import TrainingEvaluator
from dist_w2v.outputs.metrics import make_logger, start_wandb
from dist_w2v.parallel.env import (
    DistEnv,
    check_threads,
    choose_backend,
    choose_device,
    distributed,
    on_main_rank,
    on_node_main,
    same_on_every_rank,
    user_dirs,
)
from dist_w2v.parallel.exchange import resolve_exchange
from dist_w2v.train.checkpoint import Checkpointer, Found
from dist_w2v.train.lock import check_unlocked, run_dir_lock
from dist_w2v.train.loop import Trainer, check_compatible, check_cuda_graph, check_same_settings
from dist_w2v.train.stop import StopRequest, requeue_slurm_job


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def effective_resume(resume: str | None, env: DistEnv, checkpointer: Checkpointer) -> str | None:
    """Restarted workers resume by themselves; a fresh run never silently reuses a run dir.

    A restart continues from the newest checkpoint even when the first attempt was given
    ``--resume FILE``: going back to FILE would throw away what the attempt saved since.
    """
    if env.restart_count > 0 and (resume is None or checkpointer.checkpoints()):
        return "auto"
    if resume is None and checkpointer.checkpoints():
        raise UserError(
            f"{checkpointer.directory} already holds checkpoints; pass --resume auto to continue "
            "that run, or choose another --run-dir"
        )
    return resume


def refuse_finished_outputs(run_dir: Path, resume: str | None, overwrite: bool,
                            checkpointer: Checkpointer) -> None:
    """A fresh start (no --resume, or --resume auto with no checkpoint) never silently replaces
    a finished run's word vectors; resuming that run's own checkpoints may rewrite them."""
    fresh = resume is None or (resume == "auto" and not checkpointer.checkpoints())
    if fresh and not overwrite and (run_dir / CENTER_FILE).exists():
        raise UserError(
            f"{run_dir} already holds a finished run's outputs ({CENTER_FILE}); pass --overwrite "
            "to replace them, or choose another --run-dir"
        )


def refuse_foreign_run_dir(run_dir: Path) -> None:
    """A run writes config.yaml (and the rest) under fixed names: in a folder that holds no run
    yet, a config.yaml that is no dist-w2v config is a user's file (`--run-dir .` in a project
    of another tool), which the run would replace. Other files of the user's (a log, notes)
    are left alone and stay. A file where the checkpoints go would fail only at the first
    checkpoint, after an epoch of training."""
    checkpoints = run_dir / "checkpoints"
    if os.path.lexists(checkpoints) and not checkpoints.is_dir():
        raise UserError(f"{checkpoints} is not a folder, and the run's checkpoints go there; "
                        "move it away or choose another --run-dir")
    config = run_dir / "config.yaml"
    if checkpoints.is_dir() or (run_dir / CENTER_FILE).exists() or not config.is_file():
        return
    try:
        load_config(config)  # a run that failed before its first checkpoint wrote one
    except UserError:
        raise UserError(f"--run-dir {run_dir} holds a config.yaml of no dist-w2v run, which a "
                        "run would replace; move that file, or choose a new or empty "
                        "folder") from None


@contextlib.contextmanager
def run_dir_held(env: DistEnv, run_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the block; every rank fails if it is taken."""
    with contextlib.ExitStack() as stack:
        on_main_rank(env, lambda: stack.enter_context(run_dir_lock(run_dir)))
        yield


def check_writable(run_dir: Path) -> None:
    """The run dir, or the nearest folder above it that is there, takes new files (--check: the
    run itself finds out when it takes its lock)."""
    there = next(folder for folder in (run_dir, *run_dir.parents) if os.path.lexists(folder))
    problem = ("not a folder" if not there.is_dir()
               else None if os.access(there, os.W_OK | os.X_OK) else "permission denied")
    if problem:
        raise UserError(f"cannot write to run directory {run_dir} ({problem} at {there}); "
                        "choose a writable --run-dir")


def check_run(config_path: str, overrides: list[str], run_dir: str | None, resume: str | None,
              overwrite: bool, environ: Mapping[str, str], world_size: int = 1) -> int:
    """``train --check``: config, device, the shard split of ``world_size`` processes (and for
    more than one their backend and exchange), run directory, the checkpoint to resume and its
    settings, and that the data is there, as such a run would check them; writes nothing to
    the run directory and prints nothing when all is well. The corpus's contents are read when
    it is prepared (training's first step), its fit to a checkpoint then too."""
    cfg = load_config(config_path, overrides)
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1 (got {world_size})")
    check_settings(cfg, world_size)
    run_path = Path(run_dir) if run_dir else default_run_dir(config_path)
    check_unlocked(run_path)
    check_writable(run_path)
    refuse_foreign_run_dir(run_path)
    checkpointer = Checkpointer(run_path / "checkpoints", cfg.ckpt, DistEnv())
    resume = effective_resume(resume, DistEnv(), checkpointer)
    refuse_finished_outputs(run_path, resume, overwrite, checkpointer)
    found = checkpointer.resolve(resume)
    if found is not None:
        check_same_settings(found, cfg)
    check_data(cfg.data, user_dirs(environ))
    return 0


def check_settings(cfg: Config, world_size: int) -> None:
    """What a run of ``world_size`` processes refuses in its settings, wherever it runs: the
    device, the kernel and CUDA graphs for it, the backend's exchange, the shard split (also
    ``bench``'s check before it launches anything)."""
    check_threads(cfg.train.threads)
    device = choose_device(cfg.train.device, local_rank=0)
    check_cuda_graph(cfg.train, device, world_size, resolve_kernel(cfg.train.kernel, device))
    if world_size > 1:
        resolve_exchange(cfg.dist.grad_exchange, choose_backend(cfg.dist.backend, device))
    check_shards(cfg.data, cfg.train.batch_size, world_size)


def prepare_run_dir(run_dir: Path, cfg: Config, env: DistEnv) -> None:
    """Rank 0 creates the run directory and writes the resolved config; the others wait."""

    def create() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        except OSError as exc:
            raise UserError(f"cannot write to run directory {run_dir} ({exc.strerror}); "
                            "choose a writable --run-dir") from None

    on_main_rank(env, create)


def make_evaluator(cfg: Config, vocab: Vocab, say: Callable[[str], None]) -> TrainingEvaluator:
    """Rank 0's epoch-end evaluation (the trainer calls it on rank 0 only)."""
    return TrainingEvaluator(vocab, cfg.eval.probes, cfg.eval.k, say)


def open_corpus(cfg: Config, env: DistEnv, environ: Mapping[str, str],
                say: Callable[[str], None]) -> PreparedCorpus:
    """The prepared corpus to train on. One process per node prepares (or downloads) it into
    the cache when needed; the others then find it there."""
    dirs = user_dirs(environ)
    on_node_main(env, lambda: prepared_dir_for(cfg.data, dirs, say))
    corpus = load_prepared(prepared_dir_for(cfg.data, dirs, say))
    # Each rank opens the folder itself: one that a prepare replaced between two ranks' loads
    # would have them train on two corpora (or fail in DDP's first shape check).
    if not same_on_every_rank(env, corpus.identity):
        raise UserError(f"the ranks opened different corpora at {corpus.directory}: it was "
                        "prepared again while the run started; start the run again")
    return corpus


def resolve_and_check(trainer: Trainer, resume: str | None, cfg: Config) -> str | None:
    """Find the checkpoint to resume and refuse one of another run, before anything is written;
    returns what Trainer.resume should load (the verified file, so it is not searched again)."""
    found: Found | None = trainer.checkpointer.resolve(resume)
    if found is None:
        return resume
    check_compatible(found, trainer.corpus, cfg)
    return str(found.path)


def run_train(config_path: str, overrides: list[str], run_dir: str | None, resume: str | None,
              environ: Mapping[str, str], overwrite: bool = False) -> int:
    cfg = load_config(config_path, overrides)
    run_path = Path(run_dir) if run_dir else default_run_dir(config_path)
    refuse_foreign_run_dir(run_path)  # before the lock, which would leave .lock in it
    with StopRequest() as stop, distributed(cfg, environ) as env, run_dir_held(env, run_path):
        check_shards(cfg.data, cfg.train.batch_size, env.world_size)
        checkpointer = Checkpointer(run_path / "checkpoints", cfg.ckpt, env)
        resume = effective_resume(resume, env, checkpointer)
        refuse_finished_outputs(run_path, resume, overwrite, checkpointer)
        logger = make_logger(cfg, env, run_path)
        corpus = open_corpus(cfg, env, environ, logger.info)
        trainer = Trainer(cfg, env, run_path, corpus, logger,
                          evaluate=make_evaluator(cfg, corpus.vocab, logger.info), stop=stop)
        resume = resolve_and_check(trainer, resume, cfg)
        prepare_run_dir(run_path, cfg, env)
        logger.use_wandb(start_wandb(cfg, env, run_path, resume is not None, environ))
        logger.info(
            f"dist-w2v: {len(trainer.vocab)} words, {corpus.num_tokens} tokens, world size "
            f"{env.world_size} "
            f"({env.backend or 'single process'}), device {env.device}, run dir {run_path}"
        )
        try:
            trainer.resume(resume)
            result = trainer.fit()
        finally:
            logger.close()  # the loss plot and the wandb run's end, also after a failure
        if result.stopped_early:
            if stop.reason == "SIGUSR2" and env.is_main:
                requeue_slurm_job(environ, say=logger.info, step=result.state.global_step)
            return 0
        logger.info(f"done: outputs in {run_path}")
    return 0
