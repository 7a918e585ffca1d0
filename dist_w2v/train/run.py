"""``dist-w2v train`` end to end: config, process group, run directory, trainer, teardown."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from dist_w2v.config import Config, load_config
from dist_w2v.data.corpus import Vocab, corpus_path
from dist_w2v.errors import UserError
from dist_w2v.outputs.evaluate import TrainingEvaluator
from dist_w2v.outputs.metrics import make_logger, start_wandb
from dist_w2v.parallel.env import DistEnv, distributed, on_main_rank
from dist_w2v.train.checkpoint import Checkpointer
from dist_w2v.train.loop import Trainer
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


def run_train(config_path: str, overrides: list[str], run_dir: str | None, resume: str | None,
              environ: Mapping[str, str]) -> int:
    cfg = load_config(config_path, overrides)
    run_path = Path(run_dir) if run_dir else default_run_dir(config_path)
    with StopRequest() as stop, distributed(cfg, environ) as env:
        logger = make_logger(cfg, env, run_path)
        # Rank 0 alone fetches PTB when it is missing, so ranks never race on the same files.
        on_main_rank(env, lambda: corpus_path(cfg.data))
        trainer = Trainer(cfg, env, run_path, logger, stop=stop)
        resume = effective_resume(resume, env, trainer.checkpointer)
        prepare_run_dir(run_path, cfg, env)
        logger.use_wandb(start_wandb(cfg, env, run_path, resume is not None, environ))
        trainer.evaluate = make_evaluator(cfg, trainer.vocab, logger.info)
        logger.info(
            f"dist-w2v: {len(trainer.vocab)} words, world size {env.world_size} "
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
