"""The training loop: step through this rank's stream of batches, log, evaluate, checkpoint.

Resume semantics: the model, the optimizer, (epoch, step) and the loss accumulators are saved;
the stream and everything random in it are pure functions of (seed, epoch, step) (data/stream.py),
so a resumed run continues the same run.
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

from dist_w2v.config import Config, TrainConfig
from dist_w2v.data.examples import Batch, ExampleBuilder
from dist_w2v.data.prepared import PreparedCorpus
from dist_w2v.data.stream import EpochPlan, RankStream
from dist_w2v.data.vocab import Vocab
from dist_w2v.errors import UserError
from dist_w2v.model.fast_path import FIXED_SHAPE_KERNELS, resolve_kernel
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.outputs.artifacts import Embeddings, save_outputs
from dist_w2v.outputs.metrics import NullLogger
from dist_w2v.parallel.env import (
    DistEnv,
    all_sum,
    any_rank,
    barrier,
    chunk_builders,
    largest_over_ranks,
    on_main_rank,
)
from dist_w2v.parallel.exchange import ExchangeShape, wrap_model
from dist_w2v.train.checkpoint import Checkpointer, Found, make_payload
from dist_w2v.train.optim import ROW_OPTIMIZERS, build_optimizer, set_learning_rate
from dist_w2v.train.step import GraphedStep, optimizer_step
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


def has_fixed_shapes(path: str, kernel: str) -> bool:
    """Whether every step has the same shapes (static, triton): batches are padded to this
    rank's full share and nothing in the step reads a device value back."""
    return path == "fast" and kernel in FIXED_SHAPE_KERNELS


class LogWindow:
    """The steps since the last step record of this epoch: their summed loss (on the device,
    read only when logged), examples, count, and training seconds."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.restart()

    def restart(self) -> None:
        self.loss.zero_()
        self.examples, self.steps, self.started = 0, 0, time.perf_counter()

    def add(self, batch_loss: torch.Tensor, examples: int) -> None:
        self.loss += batch_loss
        self.examples += examples
        self.steps += 1

    def leave_out(self, seconds: float) -> None:
        """Time that was not training (a checkpoint write) does not count in its speed."""
        self.started += seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def check_cuda_graph(train: TrainConfig, device: torch.device, world_size: int,
                     kernel: str) -> None:
    """train.cuda_graph captures a step with fixed shapes that reads nothing back: one CUDA
    process, a fixed-shape kernel, and an optimizer whose update has fixed shapes too."""
    if train.cuda_graph and not (device.type == "cuda" and world_size == 1
                                 and has_fixed_shapes(train.path, kernel)
                                 and train.optimizer in ROW_OPTIMIZERS):
        raise UserError(
            f"train.cuda_graph needs one CUDA process, train.kernel static or triton, and "
            f"train.optimizer {' or '.join(ROW_OPTIMIZERS)} (here: {device.type}, "
            f"{world_size} process(es), kernel {kernel}, {train.optimizer}); drop "
            "train.cuda_graph")


def init_model(vocab_size: int, cfg: Config, device: torch.device) -> SkipGram:
    model = SkipGram(vocab_size, cfg.model.dim, cfg.train.path,
                     resolve_kernel(cfg.train.kernel, device))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    model.reset_parameters(generator)
    return model.to(device)


def warm_up_compiled_kernels(builder: ExampleBuilder, model: SkipGram,
                             optimizer: torch.optim.Optimizer) -> None:
    """numba loads its CPU kernels at their first call (and compiles them, the first time on a
    machine), Triton compiles its GPU kernels then: here, before training's clock starts,
    rather than inside the first epoch."""
    builder.warm_up()
    model.warm_up(builder.width, builder.cfg.num_negatives)
    warm_up = getattr(optimizer, "warm_up", None)
    if warm_up is not None:
        warm_up()


def checkpoint_payload(
    model: SkipGram, optimizer: torch.optim.Optimizer, state: TrainState, vocab: Vocab, cfg: Config,
    corpus: PreparedCorpus,
) -> dict[str, Any]:
    return make_payload(model.state_dict(), optimizer.state_dict(), asdict(state), vocab.to_dict(),
                        cfg.to_dict(), corpus.fingerprint)


# Settings that say which run a checkpoint continues: another value would silently train a
# different run (other examples, batches or update rule), so resume refuses it. Everything else
# (epochs, lr, logging, checkpoint policy, device, world size) may change on resume; the
# sharding does not depend on the world size.
RUN_DEFINING_KEYS = (
    "data.subsample_t", "data.max_window", "data.num_negatives", "data.resample_each_epoch",
    "data.shards", "data.chunk_tokens", "model.dim", "train.batch_size", "train.seed",
    "train.data_seed", "train.optimizer",
)


def check_compatible(found: Found, corpus: PreparedCorpus, cfg: Config) -> None:
    """Refuse a checkpoint of another run, naming what differs."""
    check_same_corpus(found, corpus)
    check_same_settings(found, cfg)


def check_same_corpus(found: Found, corpus: PreparedCorpus) -> None:
    payload = found.payload
    saved_vocab = payload["vocab"]["idx_to_token"]
    if saved_vocab != corpus.vocab.idx_to_token:
        raise UserError(
            f"checkpoint {found.path} was trained on a different vocabulary "
            f"({vocabulary_difference(saved_vocab, corpus.vocab.idx_to_token)}); resume with "
            "the same corpus and data settings"
        )
    if payload.get("corpus", corpus.fingerprint) != corpus.fingerprint:
        raise UserError(
            f"checkpoint {found.path} was trained on another corpus (token file checksum "
            f"{str(payload['corpus'])[:12]}..., this one {corpus.fingerprint[:12]}...); resume "
            "on the same corpus, or start a new --run-dir"
        )


def vocabulary_difference(saved: list[str], current: list[str]) -> str:
    if len(saved) != len(current):
        return f"{len(saved)} words, this corpus gives {len(current)}"
    index = next(i for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b)
    return (f"{len(saved)} words in both, but word {index} is {saved[index]!r} there and "
            f"{current[index]!r} here")


def check_same_settings(found: Found, cfg: Config) -> None:
    """Refuse a checkpoint saved with another value of a run-defining setting, naming it."""
    saved, current = found.payload["config"], cfg.to_dict()
    for key in RUN_DEFINING_KEYS:
        section, name = key.split(".")
        before, now = saved.get(section, {}).get(name), current[section][name]
        if before != now:
            before, now = (as_override(value) for value in (before, now))
            raise UserError(
                f"checkpoint {found.path} was saved with {key}={before} but the config says "
                f"{now}; resume with {key}={before}, or start a new --run-dir"
            )


def as_override(value: Any) -> str:
    """A config value as a key=value override spells it (an unset value is YAML's null)."""
    return "null" if value is None else str(value)


def restore(found: Found, model: SkipGram, optimizer: torch.optim.Optimizer,
            corpus: PreparedCorpus, cfg: Config) -> TrainState:
    """Load a checkpoint into the model and optimizer after checking it fits this run."""
    check_compatible(found, corpus, cfg)
    model.load_state_dict(found.payload["model"])
    optimizer.load_state_dict(found.payload["optimizer"])
    return TrainState(**found.payload["state"])


NO_EXAMPLES = ("the corpus gives no training examples in epoch {epoch}: no sentence keeps two "
               "words of the vocabulary after subsampling; train on a larger corpus, raise "
               "data.subsample_t, or lower data.min_count (for data.prepared: prepare again "
               "with a lower --min-count or a larger --max-vocab)")


class Diverged(UserError):
    """The loss or a table is no longer finite: the run stops before saving anything of it."""


class Trainer:
    """One process's view of training. Rank 0 logs, evaluates and saves; all ranks step."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        run_dir: Path,
        corpus: PreparedCorpus,
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
        self.corpus = corpus
        self.vocab = corpus.vocab
        builder = ExampleBuilder(self.vocab, cfg.data, env.device)
        workers, background = chunk_builders(env)
        self.stream = RankStream(corpus, builder, cfg.data, cfg.train.examples_seed,
                                 cfg.train.batch_size, env.world_size, env.rank,
                                 lambda t: all_sum(env, t), workers, background)
        self.model = init_model(len(self.vocab), cfg, env.device)
        self.optimizer = build_optimizer(cfg.train, self.model, self.fixed_shapes)
        check_cuda_graph(cfg.train, env.device, env.world_size, self.model.kernel)
        self.graphed: GraphedStep | None = None
        warm_up_compiled_kernels(builder, self.model, self.optimizer)
        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.ckpt, env, say=self.log.info)
        self.state = TrainState()

    # -- setup -----------------------------------------------------------------------------

    def resume(self, resume: str | None) -> None:
        """Continue from a checkpoint, or start fresh; metrics.jsonl then holds exactly the
        history of the run being continued (nothing, for a fresh start)."""
        found = self.checkpointer.resolve(resume)
        if found is not None:
            self.state = restore(found, self.model, self.optimizer, self.corpus, self.cfg)
            self.log.info(f"resumed from {found.path} at epoch {self.state.epoch + 1}, "
                          f"step {self.state.step}")
            barrier(self.env)  # every rank has read it before rank 0 renames newer files
            self.checkpointer.set_aside_newer(self.state.global_step)
        elif resume == "auto":
            self.log.info("no checkpoint to resume from; starting fresh")
        self.log.rewrite_history(self.state.history)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        ddp = wrap_model(self.model, self.env, self.cfg.dist.grad_exchange, self.exchange_shape(),
                         self.fixed_shapes)
        if self.cfg.train.compile:
            ddp = torch.compile(ddp)
        stopped = False
        try:
            while (self.state.epoch < self.cfg.train.epochs and not stopped
                   and not self.out_of_steps()):
                stopped = self.run_epoch(ddp)
        finally:
            self.stream.close()
        if not stopped:
            self.check_finite_tables()
            # A full disk fails rank 0's write; the collective tells every rank to stop too.
            on_main_rank(self.env, lambda: save_outputs(self.run_dir, self.embeddings()))
        return TrainResult(self.state, stopped, self.model)

    @property
    def fixed_shapes(self) -> bool:
        return has_fixed_shapes(self.model.path, self.model.kernel)

    def exchange_shape(self) -> ExchangeShape:
        data = self.cfg.data
        if self.fixed_shapes:  # every slot's word is listed: L = 2·max_window·(1 + K)
            rows_per_example = 1 + 2 * data.max_window * (1 + data.num_negatives)
        else:  # a center and its pairs: about (max_window + 1) contexts, each with K negatives
            rows_per_example = 1 + (data.max_window + 1) * (1 + data.num_negatives)
        per_rank = self.cfg.train.batch_size // self.env.world_size
        return ExchangeShape(len(self.vocab), self.cfg.model.dim, per_rank * rows_per_example,
                             self.env.world_size)

    def reaches_next_epoch(self, plan: EpochPlan) -> bool:
        steps_left = plan.num_steps - self.state.step
        max_steps = self.cfg.train.max_steps
        return self.state.epoch + 1 < self.cfg.train.epochs and (
            max_steps == 0 or self.state.global_step + steps_left < max_steps)

    def out_of_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.state.global_step

    def run_epoch(self, ddp: torch.nn.Module) -> bool:
        """Train the rest of the current epoch; True when a stop request ended it early."""
        started = time.perf_counter()
        epoch = self.state.epoch
        plan = self.stream.start_epoch(epoch, self.state.step)
        if plan.num_examples == 0:  # every rank holds the same all-summed counts
            if self.state.global_step == 0:
                raise UserError(NO_EXAMPLES.format(epoch=epoch + 1))
            # Later, a tiny corpus's draw can come out empty: the run goes on, as it can.
            self.log.info(f"epoch {epoch + 1} drew no examples (a tiny corpus); nothing to train")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        window = LogWindow(self.env.device)
        while self.state.step < plan.num_steps:
            self.maybe_fail()
            batch = self.stream.next_batch()
            if self.reaches_next_epoch(plan):
                self.stream.prefetch(epoch + 1)  # after this epoch's chunks are under way
            batch_loss = self.train_step(ddp, batch, plan, epoch)
            loss_sum += batch_loss
            global_size = plan.global_batch_size(self.state.step)
            window.add(batch_loss, global_size)
            self.state.step += 1
            self.state.global_step += 1
            self.state.epoch_examples += global_size
            # Global steps: an epoch may be shorter than the interval (large global batches).
            if self.state.global_step % self.cfg.log.every_steps == 0:
                self.log_window(window, plan.num_steps)
                window.restart()
            if self.stop_agreed():
                self.fold_epoch_loss(loss_sum, started)
                self.save_checkpoint()
                self.log.info(f"stopped by {self.stop.reason} at step {self.state.global_step}; "
                              "checkpoint saved, continue with --resume auto")
                return True
            if self.out_of_steps():
                self.fold_epoch_loss(loss_sum, started)
                self.finish_epoch(complete=False)
                return False
            if self.checkpointer.due(self.state.global_step) and self.state.step < plan.num_steps:
                self.fold_epoch_loss(loss_sum, started)
                loss_sum.zero_()
                written = time.perf_counter()
                self.save_checkpoint()
                # Checkpoint writes are not training time, for the epoch nor for the window.
                started = time.perf_counter()
                window.leave_out(started - written)
        self.fold_epoch_loss(loss_sum, started)
        self.finish_epoch(complete=True)
        return False

    def train_step(self, ddp: torch.nn.Module, batch: Batch, plan: EpochPlan,
                   epoch: int) -> torch.Tensor:
        """One optimizer step on this rank's slice; returns the slice's summed loss (on device)."""
        step = self.state.step
        progress = (epoch + step / plan.num_steps) / self.cfg.train.epochs
        lr = set_learning_rate(self.optimizer, self.cfg.train, progress)
        if self.fixed_shapes:
            batch = batch.padded_to(self.cfg.train.batch_size // self.env.world_size)
        # Sum scaled by W / global batch: DDP's mean over ranks then equals the global batch's
        # per-example mean, also for a tail batch that the shards fill unevenly.
        scale = self.env.world_size / plan.global_batch_size(step)
        if self.cfg.train.cuda_graph and self.graphed is None:
            self.graphed = GraphedStep(ddp, self.optimizer, batch)
        if self.graphed is not None:
            return self.graphed.step(batch, scale, lr)
        return optimizer_step(ddp, self.optimizer, batch, scale)

    def log_window(self, window: LogWindow, steps_in_epoch: int) -> None:
        """A step record: the loss and speed of the window's steps, ``window_steps`` of them
        (fewer than log.every_steps after a resume or at the start of an epoch)."""
        total = float(all_sum(self.env, window.loss.clone()))
        self.check_finite_loss(total)
        seconds = window.seconds()
        record = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "steps_in_epoch": steps_in_epoch,
            "global_step": self.state.global_step,
            "window_steps": window.steps,
            "loss": total / max(window.examples, 1),
            "center_words_per_s": window.examples / max(seconds, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.state.history.append({"kind": "step", **record})
        self.log.log_step(record)

    def fold_epoch_loss(self, loss_sum: torch.Tensor, started: float) -> None:
        """Move the device-side loss sum of this stretch into the (host, global) state."""
        total = float(all_sum(self.env, loss_sum.clone()))
        self.check_finite_loss(total)
        self.state.epoch_loss_sum += total
        self.state.epoch_seconds += time.perf_counter() - started

    def check_finite_loss(self, loss_sum: float) -> None:
        """Every rank holds the same all-reduced sum, so every rank stops together."""
        if not np.isfinite(loss_sum):
            self.diverged("the loss")

    def check_finite_tables(self) -> None:
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if any_rank(self.env, not finite):
            self.diverged("an embedding table")

    def diverged(self, what: str) -> None:
        saved = self.checkpointer.checkpoints()
        advice = (f"the last good checkpoint is {saved[0]}: lower train.lr and continue with "
                  f"--resume {saved[0]}" if saved else
                  "no checkpoint was saved yet: lower train.lr and start again")
        raise Diverged(
            f"training diverged: {what} is not finite at step {self.state.global_step} "
            f"(lr {self.optimizer.param_groups[0]['lr']:g}); {advice}"
        )

    def finish_epoch(self, complete: bool) -> None:
        """Log the epoch; a complete one is also evaluated and checkpointed, and the next
        begins. An incomplete one (train.max_steps) ends the run where it stands."""
        s = self.state
        record = {
            "epoch": s.epoch + 1,
            "global_step": s.global_step,
            "loss": s.epoch_loss_sum / max(s.epoch_examples, 1),
            "loss_cumulative": (s.loss_sum_total + s.epoch_loss_sum)
            / max(s.examples_total + s.epoch_examples, 1),
            "center_words": s.epoch_examples,
            "center_words_per_s": s.epoch_examples / max(s.epoch_seconds, 1e-9),
            "seconds": s.epoch_seconds,
            "complete": complete,
        }
        s.history.append({"kind": "epoch", **record})
        self.log.log_epoch(record)
        if not complete:
            self.save_checkpoint()
            return
        s.loss_sum_total += s.epoch_loss_sum
        s.examples_total += s.epoch_examples
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
        self.check_finite_tables()  # so the newest checkpoint is always a good one
        payload = None
        if self.env.is_main:
            payload = checkpoint_payload(self.model, self.optimizer, self.state, self.vocab,
                                         self.cfg, self.corpus)
        self.checkpointer.save(payload or {}, self.state.global_step)

    def stop_agreed(self) -> bool:
        """Every STOP_POLL_STEPS steps, whether any rank was asked to stop; every rank gets the
        answer and the reason (rank 0 requeues on a SIGUSR2 that only rank 1 may have seen)."""
        if self.state.global_step % STOP_POLL_STEPS != 0:
            return False
        self.stop.adopt(largest_over_ranks(self.env, self.stop.code))
        return self.stop.requested

    def maybe_fail(self) -> None:
        """Fault injection for the restart tests: die like a crashed worker, first attempt only."""
        debug = self.cfg.debug
        if (debug.fail_at_step == self.state.global_step and self.env.rank == debug.fail_rank
                and self.env.restart_count == 0):
            print(f"debug.fail_at_step: rank {self.env.rank} exits at step "
                  f"{self.state.global_step}", file=sys.stderr, flush=True)
            os._exit(17)

    def embeddings(self) -> Embeddings:
        # Views of the tables on CPU (no copy): they can be gigabytes.
        return Embeddings(
            center=self.model.center.weight.detach().cpu().numpy(),
            context=self.model.context.weight.detach().cpu().numpy(),
            vocab=self.vocab,
        )
