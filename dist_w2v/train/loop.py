"""The training loop: build an epoch, step through this rank's shard, log, evaluate, checkpoint.

Resume semantics: the model, the optimizer, (epoch, step) and the loss accumulators are saved;
everything random is a pure function of (seed, epoch), so a resumed run continues the same run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_w2v.config import Config
from dist_w2v.data.corpus import Vocab, load_corpus
from dist_w2v.data.examples import EpochExamples, ExampleBuilder
from dist_w2v.data.sharding import EpochSharder, ShardPlan
from dist_w2v.errors import UserError
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.outputs.artifacts import Embeddings, save_outputs
from dist_w2v.outputs.metrics import NullLogger
from dist_w2v.parallel.env import DistEnv, all_sum, barrier, broadcast_flag
from dist_w2v.parallel.exchange import wrap_model
from dist_w2v.train.checkpoint import Checkpointer, Found
from dist_w2v.train.optim import build_optimizer, set_learning_rate
from dist_w2v.train.stop import StopRequest

# How often ranks agree on whether a stop (SIGUSR2 / SIGTERM) was requested: a collective every
# step would cost a host sync per step on GPU, and SLURM's warning leaves minutes, not steps.
STOP_POLL_STEPS = 10


@dataclass
class TrainState:
    """Where the run is. ``epoch``/``step``: the next step to take. Loss sums are global."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum_total: float = 0.0
    examples_total: int = 0
    epoch_loss_sum: float = 0.0
    epoch_examples: int = 0
    epoch_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    state: TrainState
    stopped_early: bool
    model: SkipGram


def init_model(vocab_size: int, cfg: Config, device: torch.device) -> SkipGram:
    model = SkipGram(vocab_size, cfg.model.dim, cfg.train.path)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    model.reset_parameters(generator)
    return model.to(device)


def checkpoint_payload(
    model: SkipGram, optimizer: torch.optim.Optimizer, state: TrainState, vocab: Vocab, cfg: Config,
    world_size: int,
) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "vocab": vocab.to_dict(),
        "config": cfg.to_dict(),
        "world_size": world_size,
    }


# Settings that say which run a checkpoint continues: another value would silently train a
# different run (other examples, batches or update rule), so resume refuses it. Everything else
# (epochs, lr, logging, checkpoint policy, device, world size) may change on resume; the
# sharding does not depend on the world size.
RUN_DEFINING_KEYS = (
    "data.max_sentences", "data.min_count", "data.subsample_t", "data.max_window",
    "data.num_negatives", "data.resample_each_epoch", "model.dim", "train.batch_size",
    "train.seed", "train.optimizer",
)


def check_compatible(found: Found, vocab: Vocab, cfg: Config) -> None:
    """Refuse a checkpoint of another run, naming the setting that differs."""
    payload = found.payload
    saved_vocab = payload["vocab"]["idx_to_token"]
    if saved_vocab != vocab.idx_to_token:
        raise UserError(
            f"checkpoint {found.path} was trained on a different vocabulary ({len(saved_vocab)} "
            f"words, this corpus gives {len(vocab)}); resume with the same corpus and data settings"
        )
    saved, current = payload["config"], cfg.to_dict()
    for key in RUN_DEFINING_KEYS:
        section, name = key.split(".")
        before, now = saved.get(section, {}).get(name), current[section][name]
        if before != now:
            raise UserError(
                f"checkpoint {found.path} was saved with {key}={before} but the config says "
                f"{now}; resume with {key}={before}, or start a new --run-dir"
            )


def restore(found: Found, model: SkipGram, optimizer: torch.optim.Optimizer, vocab: Vocab,
            cfg: Config) -> TrainState:
    """Load a checkpoint into the model and optimizer after checking it fits this run."""
    check_compatible(found, vocab, cfg)
    model.load_state_dict(found.payload["model"])
    optimizer.load_state_dict(found.payload["optimizer"])
    return TrainState(**found.payload["state"])


class Trainer:
    """One process's view of training. Rank 0 logs, evaluates and saves; all ranks step."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        run_dir: Path,
        logger: Any = None,
        evaluate: Callable[[SkipGram, int, int], dict[str, Any]] | None = None,
        stop: StopRequest | None = None,
    ):
        self.cfg = cfg
        self.env = env
        self.run_dir = run_dir
        self.log = logger or NullLogger()
        self.evaluate = evaluate
        self.stop = stop or StopRequest()
        corpus, self.vocab = load_corpus(cfg.data)
        self.builder = ExampleBuilder(corpus, self.vocab, cfg.data, env.device)
        self.model = init_model(len(self.vocab), cfg, env.device)
        self.optimizer = build_optimizer(cfg.train, self.model)
        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.ckpt, env, say=self.log.info)
        self.sharder = EpochSharder(cfg.train.seed, cfg.train.batch_size, env.world_size, env.rank,
                                    env.device)
        self.state = TrainState()
        self._fixed_examples: EpochExamples | None = None

    # -- setup -----------------------------------------------------------------------------

    def resume(self, resume: str | None) -> None:
        """Continue from a checkpoint, or start fresh; metrics.jsonl then holds exactly the
        history of the run being continued (nothing, for a fresh start)."""
        found = self.checkpointer.resolve(resume)
        if found is not None:
            self.state = restore(found, self.model, self.optimizer, self.vocab, self.cfg)
            self.log.info(f"resumed from {found.path} at epoch {self.state.epoch + 1}, "
                          f"step {self.state.step}")
            barrier(self.env)  # every rank has read it before rank 0 renames newer files
            self.checkpointer.set_aside_newer(self.state.global_step)
        elif resume == "auto":
            self.log.info("no checkpoint to resume from; starting fresh")
        self.log.rewrite_history(self.state.history)

    # -- the loop --------------------------------------------------------------------------

    def epoch_examples(self, epoch: int) -> EpochExamples:
        if self.cfg.data.resample_each_epoch:
            return self.builder.build(self.cfg.train.seed, epoch)
        if self._fixed_examples is None:
            self._fixed_examples = self.builder.build(self.cfg.train.seed, 0)
        return self._fixed_examples

    def fit(self) -> TrainResult:
        ddp = wrap_model(self.model, self.env, self.cfg.dist.grad_exchange)
        if self.cfg.train.compile:
            ddp = torch.compile(ddp)
        stopped = False
        while self.state.epoch < self.cfg.train.epochs and not stopped:
            stopped = self.run_epoch(ddp)
        if not stopped and self.env.is_main:
            save_outputs(self.run_dir, self.embeddings())
        barrier(self.env)
        return TrainResult(self.state, stopped, self.model)

    def run_epoch(self, ddp: torch.nn.Module) -> bool:
        """Train the rest of the current epoch; True when a stop request ended it early."""
        started = time.perf_counter()
        epoch = self.state.epoch
        examples = self.epoch_examples(epoch)
        self.sharder.set_epoch(epoch)
        plan = self.sharder.plan(len(examples))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        window_loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        window_examples, window_started = 0, time.perf_counter()
        while self.state.step < len(plan):
            self.maybe_fail()
            batch_loss = self.train_step(ddp, examples, plan, epoch)
            loss_sum += batch_loss
            window_loss += batch_loss
            global_size = plan.global_batch_size(self.state.step)
            window_examples += global_size
            self.state.step += 1
            self.state.global_step += 1
            self.state.epoch_examples += global_size
            # Global steps: an epoch may be shorter than the interval (large global batches).
            if self.state.global_step % self.cfg.log.every_steps == 0:
                self.log_window(window_loss, window_examples, window_started, len(plan))
                window_loss.zero_()
                window_examples, window_started = 0, time.perf_counter()
            if self.stop_agreed():
                self.fold_epoch_loss(loss_sum, started)
                self.save_checkpoint()
                self.log.info(f"stopped by {self.stop.reason} at step {self.state.global_step}; "
                              "checkpoint saved, continue with --resume auto")
                return True
            if self.checkpointer.due(self.state.global_step) and self.state.step < len(plan):
                self.fold_epoch_loss(loss_sum, started)
                loss_sum.zero_()
                self.save_checkpoint()
                started = time.perf_counter()  # checkpoint writes are not training time
        self.fold_epoch_loss(loss_sum, started)
        self.finish_epoch()
        return False

    def train_step(self, ddp: torch.nn.Module, examples: EpochExamples, plan: ShardPlan,
                   epoch: int) -> torch.Tensor:
        """One optimizer step on this rank's slice; returns the slice's summed loss (on device)."""
        step = self.state.step
        batch = examples.batch(plan.indices(step))
        progress = (epoch + step / len(plan)) / self.cfg.train.epochs
        set_learning_rate(self.optimizer, self.cfg.train, progress)
        per_example = ddp(batch.centers, batch.contexts_negatives, batch.num_contexts,
                          batch.num_negatives)
        # Sum scaled by W / global batch: DDP's mean over ranks then equals the global batch's
        # per-example mean, also for a short last batch split unevenly across ranks.
        scale = self.env.world_size / plan.global_batch_size(step)
        self.optimizer.zero_grad(set_to_none=True)
        (per_example.sum() * scale).backward()
        self.optimizer.step()
        return per_example.detach().sum().to(torch.float64)

    def log_window(self, window_loss: torch.Tensor, window_examples: int, window_started: float,
                   steps_in_epoch: int) -> None:
        total = all_sum(self.env, window_loss.clone())
        seconds = time.perf_counter() - window_started
        record = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "steps_in_epoch": steps_in_epoch,
            "global_step": self.state.global_step,
            "loss": float(total) / max(window_examples, 1),
            "center_words_per_s": window_examples / max(seconds, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.state.history.append({"kind": "step", **record})
        self.log.log_step(record)

    def fold_epoch_loss(self, loss_sum: torch.Tensor, started: float) -> None:
        """Move the device-side loss sum of this stretch into the (host, global) state."""
        total = float(all_sum(self.env, loss_sum.clone()))
        self.state.epoch_loss_sum += total
        self.state.epoch_seconds += time.perf_counter() - started

    def finish_epoch(self) -> None:
        s = self.state
        s.loss_sum_total += s.epoch_loss_sum
        s.examples_total += s.epoch_examples
        record = {
            "epoch": s.epoch + 1,
            "global_step": s.global_step,
            "loss": s.epoch_loss_sum / max(s.epoch_examples, 1),
            "loss_cumulative": s.loss_sum_total / max(s.examples_total, 1),
            "center_words": s.epoch_examples,
            "center_words_per_s": s.epoch_examples / max(s.epoch_seconds, 1e-9),
            "seconds": s.epoch_seconds,
        }
        s.history.append({"kind": "epoch", **record})
        self.log.log_epoch(record)
        s.epoch += 1
        s.step = 0
        s.epoch_loss_sum, s.epoch_examples, s.epoch_seconds = 0.0, 0, 0.0
        self.maybe_evaluate(completed_epoch=s.epoch)
        self.save_checkpoint()

    def maybe_evaluate(self, completed_epoch: int) -> None:
        every = self.cfg.eval.every_epochs
        if self.evaluate is None or every == 0 or completed_epoch % every != 0:
            return
        if self.env.is_main:
            record = {"epoch": completed_epoch, "global_step": self.state.global_step,
                      **self.evaluate(self.model, completed_epoch, self.state.global_step)}
            self.state.history.append({"kind": "eval", **record})
            self.log.log_eval(record)
        barrier(self.env)

    def save_checkpoint(self) -> None:
        payload = None
        if self.env.is_main:
            payload = checkpoint_payload(self.model, self.optimizer, self.state, self.vocab,
                                         self.cfg, self.env.world_size)
        self.checkpointer.save(payload or {}, self.state.global_step)

    def stop_agreed(self) -> bool:
        """Every STOP_POLL_STEPS steps, whether any rank was asked to stop (all get the answer)."""
        if self.state.global_step % STOP_POLL_STEPS != 0:
            return False
        return broadcast_flag(self.env, self.stop.requested)

    def maybe_fail(self) -> None:
        """Fault injection for the restart tests: die like a crashed worker, first attempt only."""
        debug = self.cfg.debug
        if (debug.fail_at_step == self.state.global_step and self.env.rank == debug.fail_rank
                and self.env.restart_count == 0):
            print(f"debug.fail_at_step: rank {self.env.rank} exits at step "
                  f"{self.state.global_step}", file=sys.stderr, flush=True)
            os._exit(17)

    def embeddings(self) -> Embeddings:
        return Embeddings(
            center=self.model.center.weight.detach().cpu().numpy().astype(np.float32),
            context=self.model.context.weight.detach().cpu().numpy().astype(np.float32),
            vocab=self.vocab,
        )
