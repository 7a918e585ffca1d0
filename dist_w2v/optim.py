"""Optimizers for sparse embedding gradients and their learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from dist_w2v.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SparseAdam (the seed's Adam, lazily on the rows a batch touches) or plain SGD.

    torch.optim.Adam rejects sparse gradients; SparseAdam and momentum-free SGD accept them.
    """
    params = list(model.parameters())
    if cfg.optimizer == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr)


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """Constant for SparseAdam; word2vec's linear decay from lr to lr_min for SGD.

    ``progress`` is the fraction of training done (epoch + step / steps) / epochs, so the
    schedule is a pure function of the position and survives resume without saved state.
    """
    if cfg.optimizer == "sgd":
        return cfg.lr - (cfg.lr - cfg.lr_min) * min(max(progress, 0.0), 1.0)
    return cfg.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, progress: float) -> None:
    lr = learning_rate(cfg, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
