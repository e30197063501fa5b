"""NASWOT (Mellor et al. 2021), as DeRy scores candidates (dery-spec 4.2), with the official code's defects fixed.

Score of a network on a batch of B target images: every activation output (ReLU, ReLU6/Hardtanh, GELU, LeakyReLU,
SiLU, ... wherever they are computed, see :mod:`.common`) is flattened per image and binarised (value > 0) into a
code c; ``K = sum over outputs of c c^T + (1 - c)(1 - c)^T``, so ``K[a, b]`` is the number of units on which images
a and b agree; the score is ``log det K``. The network runs in training mode (batch norm on batch statistics) without
gradients; the proxy is averaged over the target batches.

**Sign and scale**: higher is better (codes that tell the images apart). Roughly B times the log of the number of
units, e.g. 300 to 450 for B = 32 and 10^4 to 10^6 units; ``-inf`` when two images share every code (K singular).

Fixed with respect to the official code: seeded random target images instead of the first ones in order (nearly a
single class); no augmentation while scoring; the head has the target's classes, not 1000; activations applied as
functions (``F.relu``) or as ``ReLU6`` are counted (module hooks on a list of classes missed them); no division by
the batch size (a constant the original NASWOT does not have; it does not change rankings).

**Block term** (the 0-1 program's objective): ``log det(K_b + I)`` where ``K_b`` sums the codes of the block's own
units only, while the block runs inside its own pretrained model on the same target batches. It measures how well
that block's units separate the target images in the context it was trained in. ``log det`` is not additive, so
the sum of block terms only approximates the assembled network's score, which is why the program's top candidates
are assembled and re-scored. The identity keeps the term finite for a block without activations.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Batch, PartTracker, WatchActivations, averaged_over_batches


def _kernel_update(kernel: torch.Tensor, output: torch.Tensor) -> None:
    codes = (output.detach().flatten(1) > 0).to(torch.float32)
    agree = codes @ codes.T  # both on
    on = codes.sum(dim=1)
    units = codes.shape[1]
    kernel += (units - on[:, None] - on[None, :] + 2 * agree).to(torch.float64)  # both on + both off


def logdet(kernel: torch.Tensor) -> float:
    sign, value = torch.linalg.slogdet(kernel)
    return float(value) if float(sign) > 0 else float("-inf")


@torch.no_grad()
def naswot(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None
           ) -> tuple[float, list[float] | None]:
    """NASWOT of ``net`` averaged over ``batches``, and the block term of each of ``parts`` (modules of ``net``)."""

    def score_batch(images: torch.Tensor, tracker: PartTracker) -> tuple[float, list[float]]:
        n = images.shape[0]
        kernel = torch.zeros(n, n, dtype=torch.float64)
        part_kernels = [torch.zeros(n, n, dtype=torch.float64) for _ in tracker.parts]

        def record(output: torch.Tensor) -> None:
            if output.dim() == 0 or output.shape[0] != n:
                return
            _kernel_update(kernel, output)
            if tracker.current is not None:
                _kernel_update(part_kernels[tracker.current], output)

        with tracker.installed(), WatchActivations(record):
            net(images)
        eye = torch.eye(n, dtype=torch.float64)
        return logdet(kernel), [logdet(part_kernel + eye) for part_kernel in part_kernels]

    return averaged_over_batches(net, batches, parts, score_batch)
