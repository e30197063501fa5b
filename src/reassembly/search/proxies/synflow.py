"""SynFlow (Tanaka et al. 2020) as a zero-cost proxy (Abdelfattah et al. 2021).

The network is linearised: every parameter replaced by its absolute value, normalisation and dropout removed (as
the zero-cost proxies' default), in float64 so deep products do not overflow. One all-ones image goes through it,
``R = sum(output)``, and the per-parameter saliency is ``|theta * dR/dtheta|``. The score is the natural log of the
saliencies summed over every parameter. The proxy needs the input shape only, not the images' content.

**Sign and scale**: higher is better. For a positively homogeneous network the summed saliency is the number of
layers times R, the product of the layers' absolute gains, so the log grows about linearly with depth: tens to a
few hundred (nats) for the zoo's networks; ``-inf`` if the flow dies.

**Block term**: the log *gain* of the block inside its own (linearised) pretrained model, ``log sum(block output) -
log sum(block input)``. Since the network's ``R`` is the product of the gains along the chain, the log of the
assembled network's flow is about the sum of its blocks' log gains (plus the stem's, stitches' and head's), which
is what the 0-1 program adds up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import Batch, PartTracker, WithoutNorms


def _log_sum(tensor: torch.Tensor) -> float:
    total = float(tensor.sum())
    return math.log(total) if total > 0 else float("-inf")


def synflow(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None
            ) -> tuple[float, list[float] | None]:
    """Log synaptic flow of ``net`` (modified in place: pass a copy) and the log gain of each of ``parts``."""
    parts = list(parts or [])
    net.double().train()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.abs_()
    net.zero_grad(set_to_none=True)
    shape = batches[0][0].shape[1:]
    ones = torch.ones(1, *shape, dtype=torch.float64)
    tracker = PartTracker(parts)
    with tracker.installed(keep=True), WithoutNorms():
        output = net(ones)
    output.sum().backward()
    saliency = sum(float((p.detach() * p.grad).abs().sum()) for p in net.parameters() if p.grad is not None)
    score = math.log(saliency) if saliency > 0 else float("-inf")
    if not parts:
        return score, None
    terms = [_log_sum(tracker.outputs[i]) - _log_sum(tracker.inputs[i]) if i in tracker.inputs else 0.0
             for i in range(len(parts))]
    return score, terms
