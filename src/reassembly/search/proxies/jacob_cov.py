"""jacob_cov (Mellor et al. 2020, the first NASWOT paper): how differently the network responds to different images.

For a target batch, the Jacobian row of image i is the gradient of the sum of the network's outputs with respect
to that image (training mode); the rows are correlated with each other (a B x B correlation matrix with
eigenvalues v), and the score is ``-sum(log(v + k) + 1 / (v + k))`` with k = 1e-5, averaged over the batches.

**Sign and scale**: higher is better (less correlated Jacobians). At most about -B (all eigenvalues 1, e.g. -32 for
a batch of 32); every eigenvalue near zero costs about 1e5, so collapsed networks score around -1e5 to -3e6.

**Block term**: the same score for the block's own map, from the tensor that reaches it inside its own pretrained
model to its output (the gradient of the summed block output with respect to the block input), on the same target
batches: how differently the block responds to the target images' features.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Batch, PartTracker, averaged_over_batches

K = 1e-5


def correlation_score(jacobian: torch.Tensor) -> float:
    """``-sum(log(v + k) + 1/(v + k))`` over the eigenvalues v of the rows' correlation matrix (a row with no
    variation correlates with nothing, itself included, which costs it the full 1/k)."""
    rows = jacobian.flatten(1).to(torch.float64)
    rows = rows - rows.mean(dim=1, keepdim=True)
    norms = rows.norm(dim=1, keepdim=True)
    rows = torch.where(norms > 0, rows / norms.clamp_min(1e-300), torch.zeros_like(rows))
    values = torch.linalg.eigvalsh(rows @ rows.T).clamp_min(0)
    return float(-(torch.log(values + K) + 1 / (values + K)).sum())


def jacob_cov(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None
              ) -> tuple[float, list[float] | None]:
    """jacob_cov of ``net`` averaged over ``batches``, and each part's own score."""

    def score_batch(images: torch.Tensor, tracker: PartTracker) -> tuple[float, list[float]]:
        x = images.clone().requires_grad_(True)
        with tracker.installed(keep=True):
            output = net(x)
        output.sum().backward()
        part_scores = []
        for index, part in enumerate(tracker.parts):
            if index not in tracker.inputs:
                part_scores.append(0.0)
                continue
            h = tracker.inputs[index].clone().requires_grad_(True)
            part(h).sum().backward()
            part_scores.append(correlation_score(h.grad))
        return correlation_score(x.grad), part_scores

    return averaged_over_batches(net, batches, parts, score_batch)
