"""The skip-gram model of the seed: two sparse embedding tables, bmm scores, masked sigmoid BCE."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dist_w2v.data.examples import mask_and_label
from dist_w2v.model.fast_path import fast_skip_gram_loss

# The kernels compiled at their first call, by device type (None: the CPU default, fused).
COMPILED_KERNELS = {"cpu": (None, "fused"), "cuda": ("triton",)}


def skip_gram(
    center: torch.Tensor, contexts_and_negatives: torch.Tensor, embed_v: nn.Module,
    embed_u: nn.Module,
) -> torch.Tensor:
    """The seed's forward: (B, 1) centers and (B, L) candidates give (B, 1, L) dot products."""
    v = embed_v(center)
    u = embed_u(contexts_and_negatives)
    return torch.bmm(v, u.permute(0, 2, 1))


def masked_bce(pred: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The seed's loss per example: sigmoid BCE averaged over the real (unmasked) slots."""
    out = F.binary_cross_entropy_with_logits(pred, label, weight=mask, reduction="none")
    return out.mean(dim=1) * mask.shape[1] / mask.sum(dim=1)


class SkipGram(nn.Module):
    """Center (v) and context (u) tables with sparse gradients; ``center`` is the word vector.

    ``path`` picks how a batch is computed: ``padded`` is the seed's bmm over all L slots (the
    reference), ``fast`` the same per-example loss from the real pairs only (fast_path.py), with
    ``kernel`` (None: the device's default).
    """

    def __init__(self, vocab_size: int, dim: int, path: str = "padded",
                 kernel: str | None = None):
        super().__init__()
        self.path = path
        self.kernel = kernel
        self.center = nn.Embedding(vocab_size, dim, sparse=True)
        self.context = nn.Embedding(vocab_size, dim, sparse=True)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for table in (self.center, self.context):
            nn.init.xavier_uniform_(table.weight, generator=generator)

    def warm_up(self, width: int, num_negatives: int) -> None:
        """Load (the first time on a machine: compile) the fast path's compiled kernel before
        training's clock starts: numba's fused CPU kernel, or Triton's, which compiles a variant
        per layout width, K and argument dtypes (ChunkExamples': int32, int64), so the warm-up
        batch has the real ones. One example on scratch tables of three rows (a vocabulary
        may have fewer), through forward and backward: the tables stay untouched."""
        weight = self.center.weight
        device = weight.device
        if self.path != "fast" or self.kernel not in COMPILED_KERNELS.get(device.type, ()):
            return
        center, context = (torch.zeros((3, weight.shape[1]), dtype=weight.dtype, device=device,
                                       requires_grad=True) for _ in range(2))
        contexts_negatives = torch.zeros((1, width), dtype=torch.int32, device=device)
        contexts_negatives[0, :2] = torch.tensor([2, 1], dtype=torch.int32)
        fast_skip_gram_loss(center, context, torch.ones(1, dtype=torch.int32, device=device),
                            contexts_negatives, torch.ones(1, dtype=torch.int64, device=device),
                            num_negatives, self.kernel).sum().backward()

    def forward(
        self, centers: torch.Tensor, contexts_negatives: torch.Tensor, num_contexts: torch.Tensor,
        num_negatives: int,
    ) -> torch.Tensor:
        """Per-example loss (B,) of a padded batch; the caller reduces it."""
        if self.path == "fast":
            return fast_skip_gram_loss(self.center.weight, self.context.weight, centers,
                                       contexts_negatives, num_contexts, num_negatives,
                                       self.kernel)
        pred = skip_gram(centers.unsqueeze(1), contexts_negatives, self.center, self.context)
        mask, label = mask_and_label(num_contexts, contexts_negatives.shape[1], num_negatives)
        return masked_bce(pred.squeeze(1), label, mask)
