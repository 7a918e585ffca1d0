"""Where one training step goes: sampling, slicing, forward, backward, coalesce, optimizer.

Runs the padded reference and the fast path side by side on a real PTB epoch, interleaved
(every round times each configuration once, in turn) so that a machine shared with other work
slows them alike; reports the median over rounds of each phase's per-step median.

    python benchmarks/step_profile.py --batch-sizes 512 4096 --optimizers sparse_adam sgd

``--triton-shapes 32x4 64x4`` times the triton kernel at other slot blocks and warps per
program (SLOT_BLOCKxWARPS; each compiles a variant of its own).

``coalesce`` is what SparseAdam would spend inside its step turning the gradients into unique
rows (SGD adds an uncoalesced gradient directly, so it has none); ``sampling`` is the epoch
build (subsampling, windows, negatives) divided by the epoch's steps.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch

from dist_w2v.config import load_config
from dist_w2v.data.examples import ChunkExamples, ExampleBuilder
from dist_w2v.data.prepared import load_prepared
from dist_w2v.data.sources import prepared_dir_for
from dist_w2v.data.stream import ChunkSource, whole_corpus
from dist_w2v.model.fast_path import FIXED_SHAPE_KERNELS, resolve_kernel
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.parallel.env import user_dirs
from dist_w2v.train.optim import build_optimizer

PHASES = ("sampling", "slice", "forward", "backward", "coalesce", "optimizer")
DEFAULT_LR = {"adam": 0.002, "sparse_adam": 0.002, "sgd": 0.025, "rowwise_adagrad": 0.5}


@dataclass
class Setup:
    path: str
    kernel: str
    batch_size: int
    optimizer_name: str
    model: SkipGram
    optimizer: torch.optim.Optimizer
    triton_shape: tuple[int, int] | None = None  # (slots per block, warps) for kernel triton
    next_batch: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        name = self.path if self.path == "padded" else f"{self.path} {self.kernel}"
        if self.triton_shape:
            slots, warps = self.triton_shape
            name += f" {slots}x{warps}"
        return f"{name:12s} B={self.batch_size:<6d} {self.optimizer_name}"

    def use_launch_shape(self) -> None:
        """The triton kernel reads its GPU launch shape from module constants at each launch."""
        if self.triton_shape:
            from dist_w2v.model import triton_kernel

            triton_kernel.GPU_SLOT_BLOCK, triton_kernel.GPU_NUM_WARPS = self.triton_shape


def make_setup(path: str, kernel: str, batch_size: int, optimizer_name: str, vocab_size: int,
               dim: int, device: torch.device,
               triton_shape: tuple[int, int] | None = None) -> Setup:
    overrides = [f"train.optimizer={optimizer_name}", f"train.lr={DEFAULT_LR[optimizer_name]}"]
    cfg = load_config(None, overrides)
    kernel = resolve_kernel(kernel, device)
    model = SkipGram(vocab_size, dim, path, kernel)
    model.reset_parameters(torch.Generator().manual_seed(0))
    model.to(device)
    fixed_shapes = path == "fast" and kernel in FIXED_SHAPE_KERNELS
    return Setup(path, kernel, batch_size, optimizer_name, model,
                 build_optimizer(cfg.train, model, fixed_shapes), triton_shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(setup: Setup, examples: ChunkExamples, order: torch.Tensor, steps: int,
               sampling_per_step: float, device: torch.device) -> dict[str, float]:
    """Per-phase median milliseconds over ``steps`` consecutive steps of this setup."""
    spent: dict[str, list[float]] = {phase: [] for phase in PHASES}
    setup.use_launch_shape()
    num_batches = len(examples) // setup.batch_size
    for _ in range(steps):
        start = (setup.next_batch % num_batches) * setup.batch_size
        setup.next_batch += 1
        marks = [time.perf_counter()]
        batch = examples.batch(order[start:start + setup.batch_size])
        sync(device)
        marks.append(time.perf_counter())
        loss = setup.model(batch.centers, batch.contexts_negatives, batch.num_contexts,
                           batch.num_negatives).sum() / setup.batch_size
        sync(device)
        marks.append(time.perf_counter())
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        marks.append(time.perf_counter())
        if setup.optimizer_name == "sparse_adam":
            for p in setup.model.parameters():
                p.grad = p.grad.coalesce()
        sync(device)
        marks.append(time.perf_counter())
        setup.optimizer.step()
        sync(device)
        marks.append(time.perf_counter())
        spent["sampling"].append(sampling_per_step)
        for phase, (a, b) in zip(PHASES[1:], itertools.pairwise(marks), strict=True):
            spent[phase].append((b - a) * 1e3)
    return {phase: statistics.median(values) for phase, values in spent.items()}


def report(setups: list[Setup]) -> str:
    header = "| config | " + " | ".join(PHASES) + " | step ms | center words/s |"
    lines = [header, "|" + "---|" * (len(PHASES) + 3)]
    for s in setups:
        phases = {p: statistics.median(r[p] for r in s.rounds) for p in PHASES}
        total = sum(phases.values())
        cells = " | ".join(f"{phases[p]:.2f}" for p in PHASES)
        lines.append(f"| {s.label} | {cells} | {total:.2f} | {s.batch_size / total * 1e3:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--optimizers", nargs="+", default=["sparse_adam", "sgd"])
    parser.add_argument("--paths", nargs="+", default=["padded", "fast"])
    parser.add_argument("--kernels", nargs="+", default=["auto"],
                        help="the fast path's kernels (train.kernel): auto, fused, csr, index, "
                        "static, triton")
    parser.add_argument("--triton-shapes", nargs="+", default=[],
                        help="launch shapes SLOTSxWARPS for the triton kernel (e.g. 32x4 64x8; "
                        "slots at a dimension up to 128, fewer for wider rows); default: the "
                        "kernel's own")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and setup")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-sentences", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(None, [f"data.max_sentences={args.max_sentences}"])
    corpus = load_prepared(prepared_dir_for(cfg.data, user_dirs(), print))
    vocab = corpus.vocab
    source = ChunkSource(corpus, ExampleBuilder(vocab, cfg.data, device), cfg.train.seed, True)
    source.build(whole_corpus(corpus), 0)  # warm-up
    sync(device)
    started = time.perf_counter()
    examples, _ = source.build(whole_corpus(corpus), 1)
    sync(device)
    build_ms = (time.perf_counter() - started) * 1e3
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).to(device)
    combos = itertools.product(args.batch_sizes, args.optimizers, args.paths, args.kernels)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.triton_shapes]
    setups = [make_setup(p, k, b, o, len(vocab), cfg.model.dim, device, shape)
              for b, o, p, k in combos if p == "fast" or k == args.kernels[0]
              for shape in ((shapes or [None]) if p == "fast" and k == "triton" else [None])]
    for setup in setups:  # warm-up: first-call allocations and lazy optimizer state
        time_steps(setup, examples, order, 2, 0.0, device)
    for _ in range(args.rounds):
        for setup in setups:
            per_step = build_ms * setup.batch_size / len(examples)
            setup.rounds.append(time_steps(setup, examples, order, args.steps, per_step, device))
    print(f"epoch build {build_ms:.0f} ms for {len(examples):,} centers; "
          f"{args.threads} threads, device {device}, median of {args.rounds} interleaved rounds "
          f"x {args.steps} steps (ms per step)")
    print(report(setups))


if __name__ == "__main__":
    main()
