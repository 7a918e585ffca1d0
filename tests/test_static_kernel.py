"""The static kernel's step: fixed shapes, no value read back from the device, same training.

On a GPU, tests/test_gpu.py runs the step under ``torch.cuda.set_sync_debug_mode("error")``.
Here, without one, the same property is checked one level down: a dispatch mode records the
ATen ops of real training steps, and none may be an op whose output shape or result depends on
tensor values (nonzero, unique, coalesce, masked_select, item, ...): those are the ops that make
a GPU wait for the host. The detector is shown to catch them in the other kernels' steps.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from conftest import prepare, ptb_batch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_w2v.config import load_config
from dist_w2v.data.examples import Batch
from dist_w2v.errors import UserError
from dist_w2v.model.skipgram import SkipGram
from dist_w2v.model.static_rows import PAD_ROW, static_unique_rows, sum_duplicate_rows
from dist_w2v.parallel.env import DistEnv, distributed
from dist_w2v.parallel.exchange import wrap_model
from dist_w2v.train.loop import Trainer
from dist_w2v.train.optim import build_optimizer
from dist_w2v.train.step import GraphedStep

PARAMS = ("center.weight", "context.weight")
pytestmark = pytest.mark.usefixtures("one_thread")
# torch's Adam reads its step counter with .item(), a CPU tensor also when the tables are on a
# GPU (no sync there, tests/test_gpu.py), but here indistinguishable from a device read.
ROW_OPTIMIZERS = ["sgd", "sgd train.lr=100 train.max_row_step=0.002", "rowwise_adagrad"]

# Ops whose output shape or value the host can only know by reading device memory.
VALUE_DEPENDENT = {"nonzero", "nonzero_numpy", "argwhere", "_unique", "_unique2", "unique_dim",
                   "unique_consecutive", "unique_dim_consecutive", "masked_select",
                   "_local_scalar_dense", "bincount", "_coalesce", "repeat_interleave",
                   "is_nonzero", "equal", "histc"}


class ValueDependentOps(TorchDispatchMode):
    """Counts the value-dependent ops dispatched while it is active (boolean indexing too)."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in VALUE_DEPENDENT or (name.startswith("index") and _bool_index(args)):
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def test_rows_at_a_fixed_length_match_torch_unique_and_coalesce():
    ids = torch.tensor([5, 3, 5, 9, 7, 3])
    for table_rows in (10, 1000):  # the flag-vector branch, then the sort branch
        rows, position = static_unique_rows(ids, table_rows)
        expected_rows, expected_position = torch.unique(ids, return_inverse=True)
        assert rows.shape == (min(6, table_rows),)
        assert torch.equal(rows[:4], expected_rows)
        assert torch.equal(rows[4:], torch.full((2,), PAD_ROW))
        assert torch.equal(position, expected_position)
    values = torch.arange(12.0).reshape(6, 2)
    rows, summed = sum_duplicate_rows(ids, values)
    coalesced = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (10, 2),
                                        check_invariants=True).coalesce()
    assert rows.shape == (6,) and summed.shape == (6, 2)
    assert torch.equal(rows[:4], coalesced.indices()[0])
    assert torch.equal(summed[:4], coalesced.values())
    assert torch.equal(summed[4:], torch.zeros(2, 2))


def test_padding_entries_keep_a_slot_each_when_rows_are_summed():
    """A fixed-length list's PAD_ROW entries come out after the real rows, one slot each: not
    summed into one (on a GPU, one row that every padding entry's atomic add waits on)."""
    ids = torch.tensor([PAD_ROW, 5, PAD_ROW, 3, 5, PAD_ROW])
    values = torch.arange(12.0).reshape(6, 2)
    rows, summed = sum_duplicate_rows(ids, values)
    assert torch.equal(rows, torch.tensor([3, 5, PAD_ROW, PAD_ROW, PAD_ROW, PAD_ROW]))
    assert torch.equal(summed[:2], torch.stack([values[3], values[1] + values[4]]))
    assert torch.equal(summed[2], torch.zeros(2))
    # Each padding entry's value (zero in training) lands in a slot of its own.
    padding_values = sorted(tuple(row.tolist()) for row in summed[3:])
    assert padding_values == sorted(tuple(values[i].tolist()) for i in (0, 2, 5))


def test_padding_examples_score_nothing_and_move_nothing(ptb_epoch):
    """A short batch padded to the step's fixed size trains exactly as the short batch."""
    batch = ptb_batch(ptb_epoch, 300)
    out = []
    for b in (batch, batch.padded_to(512)):
        model = SkipGram(ptb_epoch[1], 100, "fast", "static")
        model.reset_parameters(torch.Generator().manual_seed(0))
        loss = model(b.centers, b.contexts_negatives, b.num_contexts, b.num_negatives)
        loss.sum().backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (short_loss, short_grads), (padded_loss, padded_grads) = out
    assert padded_loss.shape == (512,)
    assert torch.equal(padded_loss[:300], short_loss)
    assert torch.equal(padded_loss[300:], torch.zeros(212))
    for name in PARAMS:
        assert padded_grads[name].is_sparse
        torch.testing.assert_close(padded_grads[name].to_dense(), short_grads[name].to_dense(),
                                   rtol=0, atol=1e-9)


def test_gradient_lengths_follow_the_batch_shape_not_its_words(ptb_epoch):
    vocab_size = ptb_epoch[1]
    model = SkipGram(vocab_size, 100, "fast", "static")
    for seed in (0, 1):
        b = ptb_batch(ptb_epoch, 64, seed)
        model.zero_grad(set_to_none=True)
        model(b.centers, b.contexts_negatives, b.num_contexts, b.num_negatives).sum().backward()
        assert model.center.weight.grad._nnz() == 64
        assert model.context.weight.grad._nnz() == min(64 * b.contexts_negatives.shape[1],
                                                       vocab_size)


@pytest.mark.parametrize("optimizer", [*ROW_OPTIMIZERS, "adam", "sparse_adam"])
def test_fixed_shape_optimizer_steps_equal_the_reference(ptb_epoch, optimizer):
    """Repeated rows at a fixed length, summed by the optimizer, move the tables exactly as
    the padded reference's coalesced gradients (two steps: the second sees optimizer state)."""
    batch = ptb_batch(ptb_epoch, 512, seed=2)
    optimizer, *extra = optimizer.split()
    cfg = load_config(None, [f"train.optimizer={optimizer}", "train.lr=0.01", *extra])
    reference = SkipGram(ptb_epoch[1], 100, "padded")
    reference.reset_parameters(torch.Generator().manual_seed(0))
    static = copy.deepcopy(reference)
    static.path, static.kernel = "fast", "static"
    for model, fixed in ((reference, False), (static, True)):
        opt = build_optimizer(cfg.train, model, fixed_shapes=fixed)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(batch.centers, batch.contexts_negatives, batch.num_contexts,
                  batch.num_negatives).mean().backward()
            opt.step()
    atol = 5e-6 if optimizer in ("adam", "rowwise_adagrad", "sparse_adam") else 1e-6
    for (name, a), b in zip(static.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


def value_dependent_ops_in_steps(ptb, tmp_path, overrides: list[str], exchange: str | None,
                                 steps: int = 3) -> Counter:
    """The value-dependent ops of ``steps`` real training steps (after one warm-up step that
    creates the optimizers' state), on a one-process gloo group when ``exchange`` is given."""
    cfg = load_config(None, [f"data.dir={ptb}", "data.max_sentences=2000", "train.threads=1",
                             "train.device=cpu", "train.batch_size=256", "eval.every_epochs=0",
                             f"dist.grad_exchange={exchange or 'auto'}", *overrides])
    corpus = prepare(cfg.data, tmp_path / "cache")

    def run(env: DistEnv) -> Counter:
        trainer = Trainer(cfg, env, tmp_path / "run", corpus)
        module = wrap_model(trainer.model, env, cfg.dist.grad_exchange, trainer.exchange_shape(),
                            trainer.fixed_shapes)
        plan = trainer.stream.start_epoch(0)
        batches = [trainer.stream.next_batch() for _ in range(steps + 1)]
        trainer.train_step(module, batches[0], plan, 0)
        with ValueDependentOps() as detector:
            for batch in batches[1:]:
                trainer.train_step(module, batch, plan, 0)
        trainer.stream.close()
        return detector.seen

    if exchange is None:
        return run(DistEnv())
    with distributed(cfg, {}, store=dist.FileStore(str(tmp_path / "store"), 1)) as env:
        return run(env)


@pytest.mark.parametrize("exchange", [None, "allgather", "dense"])
@pytest.mark.parametrize("optimizer", ROW_OPTIMIZERS)
def test_the_static_step_runs_no_value_dependent_op(ptb, tmp_path, optimizer, exchange):
    name, *extra = optimizer.split()
    seen = value_dependent_ops_in_steps(ptb, tmp_path, ["train.kernel=static",
                                                        f"train.optimizer={name}", *extra],
                                        exchange)
    assert not seen, f"value-dependent ops in the static step: {dict(seen)}"


def test_the_detector_sees_the_syncs_of_the_other_steps(ptb, tmp_path):
    """The index kernel lists its pairs and rows with nonzero; SparseAdam coalesces; the
    sparse all-gather coalesces and reads its counts: all found."""
    index = value_dependent_ops_in_steps(ptb, tmp_path / "index", ["train.kernel=index"],
                                         "allgather")
    assert index["nonzero"] >= 3 * 3 and index["_coalesce"] >= 2 * 3, dict(index)
    sparse_adam = value_dependent_ops_in_steps(ptb, tmp_path / "sparse_adam",
                                               ["train.kernel=static",
                                                "train.optimizer=sparse_adam"], None)
    assert sparse_adam["_coalesce"] >= 2 * 3, dict(sparse_adam)


def test_a_ptb_slice_trains_the_same_with_the_static_and_fused_kernels(ptb, tmp_path):
    """Two epochs, short tail batches padded: the static kernel's tables equal the fused
    kernel's up to float rounding (the kernels add the same terms in other orders)."""
    tables = {}
    for kernel in ("static", "fused"):
        cfg = load_config(None, [f"data.dir={ptb}", "data.max_sentences=2000", "model.dim=16",
                                 "train.epochs=2", "train.batch_size=384", "train.threads=1",
                                 "train.optimizer=sgd", "train.lr=300", "train.lr_min=1",
                                 "eval.every_epochs=0", f"train.kernel={kernel}"])
        trainer = Trainer(cfg, DistEnv(), tmp_path / kernel,
                          prepare(cfg.data, tmp_path / "cache"))
        assert trainer.fixed_shapes == (kernel == "static")
        trainer.fit()
        tables[kernel] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for name in PARAMS:
        torch.testing.assert_close(tables["static"][name], tables["fused"][name], rtol=0,
                                   atol=1e-5, msg=name)



@pytest.mark.parametrize("optimizer", ROW_OPTIMIZERS)
def test_a_device_held_learning_rate_moves_rows_as_the_float_one(ptb_epoch, optimizer):
    """A CUDA graph reads the rate from device memory (RowOptimizer.device_lr)."""
    batch = ptb_batch(ptb_epoch, 512, seed=4)
    name, *extra = optimizer.split()
    cfg = load_config(None, [f"train.optimizer={name}", "train.lr=0.05", *extra])
    tables = []
    for held in (False, True):
        model = SkipGram(ptb_epoch[1], 100, "fast", "static")
        model.reset_parameters(torch.Generator().manual_seed(0))
        opt = build_optimizer(cfg.train, model, fixed_shapes=True)
        if held:
            opt.device_lr = torch.tensor(0.0)
        for lr in (cfg.train.lr, cfg.train.lr / 2):
            for group in opt.param_groups:
                group["lr"] = lr if not held else 1e9  # a held rate ignores the group's
            if held:
                opt.device_lr.fill_(lr)
            opt.zero_grad(set_to_none=True)
            model(batch.centers, batch.contexts_negatives, batch.num_contexts,
                  batch.num_negatives).mean().backward()
            opt.step()
        tables.append(dict(model.named_parameters()))
    for name in PARAMS:
        torch.testing.assert_close(tables[1][name], tables[0][name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd train.lr=300 train.lr_min=1", "rowwise_adagrad"])
def test_the_graphable_step_trains_like_the_plain_step(ptb, tmp_path, optimizer):
    """GraphedStep without the capture (static buffers, device-held scale and rate) over two
    epochs with padded tail batches: the tables of the plain static step."""
    name, *extra = optimizer.split()
    tables = []
    for graphable in (False, True):
        cfg = load_config(None, [f"data.dir={ptb}", "data.max_sentences=2000", "model.dim=16",
                                 "train.epochs=2", "train.batch_size=384", "train.threads=1",
                                 f"train.optimizer={name}", *extra, "train.kernel=static",
                                 "eval.every_epochs=0"])
        trainer = Trainer(cfg, DistEnv(), tmp_path / str(graphable),
                          prepare(cfg.data, tmp_path / "cache"))
        if graphable:
            width = trainer.stream.source.builder.width
            shape = Batch(torch.zeros(384, dtype=torch.int32),
                          torch.zeros((384, width), dtype=torch.int32),
                          torch.zeros(384, dtype=torch.int64), cfg.data.num_negatives)
            trainer.graphed = GraphedStep(trainer.model, trainer.optimizer, shape, capture=False)
        trainer.fit()
        tables.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    used = bool(trainer.graphed.buffers.centers.ne(0).any())
    assert used, "the steps did not go through its buffers"
    for param in PARAMS:
        torch.testing.assert_close(tables[1][param], tables[0][param], rtol=0, atol=1e-6)


def test_cuda_graphs_are_refused_where_they_cannot_capture(ptb, tmp_path):
    cfg = load_config(None, [f"data.dir={ptb}", "data.max_sentences=500", "train.threads=1",
                             "train.cuda_graph=true", "train.optimizer=sgd"])
    with pytest.raises(UserError, match=r"^train.cuda_graph needs one CUDA process, train.kernel "
                       r"static or triton, .* \(here: cpu, 1 process\(es\), kernel fused, "
                       r"sgd\); drop train.cuda_graph$"):
        Trainer(cfg, DistEnv(), tmp_path / "run", prepare(cfg.data, tmp_path / "cache"))
