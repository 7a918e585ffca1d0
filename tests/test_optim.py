"""The update rules and the learning-rate schedule: row-wise Adagrad by hand, laziness, exact
resume of its state, warm-up, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from conftest import SMOKE, run_cli

from dist_w2v.config import load_config
from dist_w2v.errors import UserError
from dist_w2v.train.optim import RowCappedSGD, RowwiseAdagrad, learning_rate


def sparse_grad(rows: list[int], values: list[list[float]], shape: tuple[int, int],
                coalesced: bool = False) -> torch.Tensor:
    grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor(values), shape)
    return grad.coalesce() if coalesced else grad


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "tensor-ops"])
def test_rowwise_adagrad_matches_the_rule_by_hand(compiled):
    """Both implementations: the compiled CPU loop and the tensor operations GPUs run."""
    table = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    opt = RowwiseAdagrad([table], lr=0.5, eps=1e-8, initial_accumulator=0.25)
    opt.compiled = compiled
    # Row 2 appears twice (uncoalesced): its gradient is the sum [0.3, -0.4].
    table.grad = sparse_grad([0, 2, 2], [[0.6, -0.8], [0.1, -0.1], [0.2, -0.3]], (3, 2))
    opt.step()
    # Row 0: accumulator 0.25 + (0.36 + 0.64) / 2 = 0.75; row 2: 0.25 + (0.09 + 0.16) / 2 = 0.375.
    step0 = 0.5 / (math.sqrt(0.75) + 1e-8)
    step2 = 0.5 / (math.sqrt(0.375) + 1e-8)
    expected = torch.tensor([[1.0 - step0 * 0.6, 2.0 + step0 * 0.8], [3.0, 4.0],
                             [5.0 - step2 * 0.3, 6.0 + step2 * 0.4]])
    torch.testing.assert_close(table.detach(), expected)
    torch.testing.assert_close(opt.state[table]["sum"], torch.tensor([0.75, 0.25, 0.375]))
    # A second step adds to the same accumulator.
    table.grad = sparse_grad([0], [[1.0, 1.0]], (3, 2))
    before = table.detach().clone()
    opt.step()
    step0 = 0.5 / (math.sqrt(1.75) + 1e-8)
    torch.testing.assert_close(table.detach()[0], before[0] - step0)
    torch.testing.assert_close(table.detach()[1:], before[1:])


def test_row_capped_sgd_is_sgd_below_the_cap_and_capped_above():
    table = torch.nn.Parameter(torch.zeros(3, 2))
    opt = RowCappedSGD([table], lr=2.0, max_row_step=1.0)
    # Row 0's SGD step [0.6, 0.8] has norm 1: kept. Row 2's [3, 4] has norm 5: scaled to 1.
    table.grad = sparse_grad([0, 2], [[0.3, 0.4], [1.5, 2.0]], (3, 2))
    opt.step()
    torch.testing.assert_close(table.detach(), torch.tensor([[-0.6, -0.8], [0.0, 0.0],
                                                             [-0.6, -0.8]]))
    assert opt.state_dict()["state"] == {}  # stateless: resume needs nothing


def test_a_dense_gradient_updates_every_row_by_the_same_rule():
    sparse_table = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    dense_table = torch.nn.Parameter(sparse_table.detach().clone())
    grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    opts = [RowwiseAdagrad([t], lr=0.1) for t in (sparse_table, dense_table)]
    sparse_table.grad, dense_table.grad = grad.to_sparse(1), grad.clone()
    for opt in opts:
        opt.step()
    torch.testing.assert_close(sparse_table.detach(), dense_table.detach())


def test_rows_outside_the_batch_and_their_state_never_change():
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(50, 8, generator=gen))
    opt = RowwiseAdagrad([table], lr=0.1, initial_accumulator=0.1)
    for _ in range(5):
        rows = torch.randint(0, 20, (30,), generator=gen)  # rows 20..49 are never touched
        before, state_before = table.detach().clone(), opt.state[table].get("sum")
        state_before = None if state_before is None else state_before.clone()
        table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(30, 8, generator=gen),
                                             (50, 8))
        opt.step()
        touched = set(rows.tolist())
        untouched = torch.tensor(sorted(set(range(50)) - touched))
        torch.testing.assert_close(table.detach()[untouched], before[untouched], rtol=0, atol=0)
        if state_before is not None:
            torch.testing.assert_close(opt.state[table]["sum"][untouched],
                                       state_before[untouched], rtol=0, atol=0)
    assert torch.all(opt.state[table]["sum"][20:] == 0.1)


def test_state_dict_round_trip_gives_identical_next_steps():
    gen = torch.Generator().manual_seed(0)
    grads = [sparse_grad(torch.randint(0, 10, (6,), generator=gen).tolist(),
                         torch.randn(6, 4, generator=gen).tolist(), (10, 4)) for _ in range(4)]
    table = torch.nn.Parameter(torch.randn(10, 4, generator=gen))
    opt = RowwiseAdagrad([table], lr=0.05)
    for grad in grads[:2]:
        table.grad = grad
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for value in saved["state"].values():  # tensors and plain numbers only (checkpointable)
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in value.values())
    resumed_table = torch.nn.Parameter(table.detach().clone())
    resumed = RowwiseAdagrad([resumed_table], lr=0.05)
    resumed.load_state_dict(saved)
    for grad in grads[2:]:
        table.grad, resumed_table.grad = grad, grad.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(resumed_table.detach(), table.detach(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.state[resumed_table]["sum"], opt.state[table]["sum"],
                               rtol=0, atol=0)


def test_schedule_warms_up_then_decays_as_a_pure_function_of_progress():
    cfg = load_config(None, ["train.optimizer=rowwise_adagrad", "train.lr=0.2",
                             "train.lr_min=0.0", "train.warmup=0.1"]).train
    assert learning_rate(cfg, 0.0) == 0.0
    assert learning_rate(cfg, 0.05) == pytest.approx(0.5 * 0.2 * 0.95)
    assert learning_rate(cfg, 0.1) == pytest.approx(0.2 * 0.9)
    assert learning_rate(cfg, 1.0) == pytest.approx(0.0)
    constant = load_config(None, ["train.optimizer=rowwise_adagrad", "train.lr=0.2",
                                  "train.lr_schedule=constant"]).train
    assert learning_rate(constant, 0.7) == 0.2
    adam = load_config(None, ["train.optimizer=sparse_adam", "train.lr=0.02"]).train
    assert learning_rate(adam, 0.7) == 0.02  # auto: the Adams stay constant, as before


@pytest.mark.parametrize("override, fragment", [
    ("train.warmup=1.0", "train.warmup must be in [0, 1)"),
    ("train.lr_schedule=cosine", "train.lr_schedule must be one of"),
    ("train.adagrad_eps=0", "train.adagrad_eps must be > 0"),
    ("train.optimizer=sgd train.lr=1 train.lr_min=10", "train.lr_min must be <= train.lr"),
])
def test_bad_settings_are_refused(override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_config(None, override.split())


def test_rowwise_adagrad_trains_through_the_cli(tmp_path):
    result = run_cli("train", "--config", "configs/ptb.yaml", "--run-dir", str(tmp_path / "run"),
                     "data.max_sentences=3000", *SMOKE, "train.epochs=3",
                     "train.optimizer=rowwise_adagrad", "train.lr=0.05", "train.warmup=0.1")
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    losses = [r["loss"] for r in metrics if r["kind"] == "epoch"]
    assert len(losses) == 3 and losses[2] < losses[0]
