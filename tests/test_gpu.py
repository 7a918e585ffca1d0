"""CUDA checks, skipped on machines without a GPU (benchmarks/gpu.sh runs them on one):

* the fast path equals the padded reference on CUDA, for the static (default), index and triton
  kernels (tests/test_triton_kernel.py runs on CUDA too);
* the fixed-shape kernels' training step (static, triton: forward, backward, NCCL exchange at
  world size 1 through the fixed-shape hooks, the optimizer) runs under
  set_sync_debug_mode("error");
* the step captured as a CUDA graph (train.cuda_graph) trains like the eager one, with either;
* the trainer's setup compiles the triton kernels, so that training compiles nothing;
* chunks built on the background thread's side stream train like chunks built inline;
* one PTB epoch through NCCL (world size 1, the all-gather hook) trains like gloo and like a
  plain process.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import REPO, cli_env, compiled_variants, one_chunk_examples

from dist_w2v.config import load_config
from dist_w2v.data.examples import ExampleBuilder
from dist_w2v.model.fast_path import fast_skip_gram_loss
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.outputs.metrics import read_metrics
from dist_w2v.parallel.env import DistEnv, distributed
from dist_w2v.parallel.exchange import wrap_model
from dist_w2v.train.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def cuda_epoch(prepared_ptb):
    cfg = load_config(None, [])
    builder = ExampleBuilder(prepared_ptb.vocab, cfg.data, CUDA)
    return one_chunk_examples(prepared_ptb, builder), len(prepared_ptb.vocab)


def reference_and_fast(cuda_epoch, size: int, kernel: str):
    examples, vocab_size = cuda_epoch
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
    batch = examples.batch(order[:size].to(CUDA))
    weights = torch.rand(size, generator=torch.Generator().manual_seed(1)).to(CUDA) / size
    padded = SkipGram(vocab_size, 100, "padded")
    padded.reset_parameters(torch.Generator().manual_seed(0))
    padded.to(CUDA)
    fast = SkipGram(vocab_size, 100, "fast").to(CUDA)
    fast.load_state_dict(padded.state_dict())
    ref = padded(batch.centers, batch.contexts_negatives, batch.num_contexts, 5)
    (ref * weights).sum().backward()
    out = fast_skip_gram_loss(fast.center.weight, fast.context.weight, batch.centers,
                              batch.contexts_negatives, batch.num_contexts, 5, kernel)
    (out * weights).sum().backward()
    return (ref, padded), (out, fast)


def assert_equal_steps(reference, fast) -> None:
    (ref, padded), (out, fast_model) = reference, fast
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for a, b in zip(fast_model.parameters(), padded.parameters(), strict=True):
        assert a.grad.is_sparse
        torch.testing.assert_close(a.grad.to_dense(), b.grad.to_dense(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kernel", ["static", "index", "triton"])
@pytest.mark.parametrize("size", [4096, 65536])
def test_fast_equals_padded_on_cuda(cuda_epoch, size, kernel):
    assert_equal_steps(*reference_and_fast(cuda_epoch, size, kernel))


@pytest.mark.xfail(strict=False, reason="cuSPARSE may assume sorted, distinct columns per row; "
                   "CUDA uses the index kernel, this records whether CSR would work too")
def test_csr_kernel_on_cuda(cuda_epoch):
    assert_equal_steps(*reference_and_fast(cuda_epoch, 4096, "csr"))


def steps_under_sync_error_mode(trainer: Trainer, module: torch.nn.Module, steps: int) -> None:
    """``steps`` real training steps with any host sync raising, after two warm-up steps
    (the optimizers' lazy state; DDP rebuilds its buckets after its first iteration)."""
    plan = trainer.stream.start_epoch(0)
    batches = [trainer.stream.next_batch() for _ in range(steps + 2)]
    trainer.stream.close()  # no chunk build (which may sync) runs beside the checked steps
    for batch in batches[:2]:
        trainer.train_step(module, batch, plan, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            trainer.train_step(module, batch, plan, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


STATIC_STEPS = [("static", optimizer, exchange) for exchange in (None, "allgather", "dense")
                for optimizer in ("sgd", "sgd train.lr=100 train.max_row_step=0.2",
                                  "rowwise_adagrad", "adam")]
# The triton kernel shares the static kernel's gradients; its own part is the kernel launches.
TRITON_STEPS = [("triton", "sgd", None), ("triton", "rowwise_adagrad", "allgather"),
                ("triton", "sgd train.lr=100 train.max_row_step=0.2", "dense")]


@pytest.mark.parametrize(("kernel", "optimizer", "exchange"), STATIC_STEPS + TRITON_STEPS)
def test_the_fixed_shape_step_never_syncs(ptb, prepared_ptb, tmp_path, kernel, optimizer,
                                          exchange):
    """Forward, backward, the exchange (NCCL at world size 1, through the fixed-shape hooks)
    and the optimizer, under set_sync_debug_mode("error"), at B=16384, with the CUDA default
    kernel (static) and the triton kernel. SparseAdam is left out: torch's coalesces its
    gradient."""
    name, *extra = optimizer.split()
    cfg = load_config(None, [f"data.dir={ptb}", "train.device=cuda", "train.batch_size=16384",
                             f"train.optimizer={name}", *extra, "eval.every_epochs=0",
                             f"train.kernel={kernel}", "dist.backend=nccl",
                             f"dist.grad_exchange={exchange or 'auto'}"])

    def run(env: DistEnv) -> None:
        trainer = Trainer(cfg, env, tmp_path / "run", prepared_ptb)
        assert trainer.model.kernel == kernel and trainer.fixed_shapes
        module = wrap_model(trainer.model, env, cfg.dist.grad_exchange, trainer.exchange_shape(),
                            trainer.fixed_shapes)
        steps_under_sync_error_mode(trainer, module, steps=10)

    if exchange is None:
        run(DistEnv(device=CUDA))
        return
    with distributed(cfg, {}, store=dist.FileStore(str(tmp_path / "store"), 1)) as env:
        assert env.backend == "nccl" and env.world_size == 1
        run(env)


@pytest.mark.parametrize(("kernel", "optimizer"),
                         [("static", "sgd train.lr=3000 train.lr_min=10"),
                          ("static", "rowwise_adagrad train.lr=0.25"),
                          ("triton", "rowwise_adagrad train.lr=0.25")])
def test_a_captured_step_trains_like_the_eager_one(ptb, prepared_ptb, tmp_path, kernel,
                                                   optimizer):
    """train.cuda_graph: two PTB epochs at B=4096 (warm-up steps eager, then one replay per
    step, the epochs' tail batches padded) against the eager step: the same losses and
    tables up to the atomic adds' nondeterministic order."""
    name, *extra = optimizer.split()
    runs = []
    for graph in (False, True):
        cfg = load_config(None, [f"data.dir={ptb}", "train.device=cuda", "train.batch_size=4096",
                                 "train.epochs=2", f"train.optimizer={name}", *extra,
                                 f"train.kernel={kernel}", "eval.every_epochs=0",
                                 f"train.cuda_graph={str(graph).lower()}"])
        trainer = Trainer(cfg, DistEnv(device=CUDA), tmp_path / str(graph), prepared_ptb)
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
        if graph:
            assert trainer.graphed is not None and trainer.graphed.graph is not None
        losses = [r["loss"] for r in trainer.state.history if r["kind"] == "epoch"]
        print(f"cuda_graph={graph} {kernel} {name}: epoch losses {losses}, {seconds:.2f} s")
        runs.append((losses, trainer.model.center.weight.detach().cpu()))
    (eager_losses, eager_table), (graph_losses, graph_table) = runs
    assert graph_losses == pytest.approx(eager_losses, abs=1e-3)
    assert float((graph_table - eager_table).norm() / eager_table.norm()) < 0.01


def test_the_triton_kernels_compile_before_training(ptb):
    """Triton compiles a kernel at its first launch (~1 s), one variant per argument dtypes and
    specialised integers: the trainer's setup launches both with the real ones, so that no
    compile lands in training's clock (time to quality counts it)."""
    counts = compiled_variants(f"data.dir={ptb}", "data.max_sentences=4000", "train.device=cuda",
                               "train.kernel=triton", "train.epochs=1", "train.batch_size=4096",
                               "eval.every_epochs=0")
    assert counts["trained"] == counts["setup"]
    for kernel in ("_forward", "_backward"):
        assert counts["setup"][f"dist_w2v.model.triton_kernel.{kernel}"] == 1, kernel


def train_one_epoch(tmp_path, name: str, *overrides: str, nproc: int = 1) -> dict:
    run_dir = tmp_path / name
    cli = ["-m", "dist_w2v.cli", "train", "--config", "configs/ptb.yaml", "--run-dir",
           str(run_dir), "train.epochs=1", "train.device=cuda", "eval.every_epochs=0", *overrides]
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={nproc}"]
    command = [sys.executable, *launcher, *cli] if launcher else [sys.executable, *cli]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO,
                            env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    epoch = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"][-1]
    print(f"{name}: loss {epoch['loss']:.4f}, {epoch['center_words_per_s']:,.0f} center words/s")
    return {"loss": epoch["loss"], "center": torch.from_numpy(np.load(run_dir / "center.npy"))}


def test_nccl_allgather_epoch_trains_like_gloo_and_a_plain_process(tmp_path):
    nccl = train_one_epoch(tmp_path, "nccl", "dist.backend=nccl", "dist.grad_exchange=allgather")
    gloo = train_one_epoch(tmp_path, "gloo", "dist.backend=gloo", "dist.grad_exchange=allgather")
    plain = train_one_epoch(tmp_path, "plain", nproc=0)
    for other in (gloo, plain):
        # index_add_ on CUDA adds in a nondeterministic order: equal up to float rounding.
        assert nccl["loss"] == pytest.approx(other["loss"], abs=1e-3)
        torch.testing.assert_close(nccl["center"], other["center"], rtol=0, atol=2e-2)


def test_chunks_built_on_the_side_stream_equal_inline_builds(prepared_ptb, tmp_path):
    """The background thread builds on a CUDA side stream; its chunks must equal a build on
    the current stream (stream ordering and record_stream done right)."""
    from dist_w2v.data.stream import RankStream

    cfg = load_config(None, ["data.chunk_tokens=8192"])
    builder = ExampleBuilder(prepared_ptb.vocab, cfg.data, CUDA)
    stream = RankStream(prepared_ptb, builder, cfg.data, 0, 512, 1, 0, lambda t: t)
    plan = stream.start_epoch(0)
    streamed = [stream.next_batch() for _ in range(plan.num_steps)]
    stream.close()
    inline = RankStream(prepared_ptb, builder, cfg.data, 0, 512, 1, 0, lambda t: t)
    inline.prefetcher.side = None  # build on the current stream
    inline.start_epoch(0)
    for batch in streamed:
        other = inline.next_batch()
        assert torch.equal(batch.contexts_negatives, other.contexts_negatives)
    inline.close()
