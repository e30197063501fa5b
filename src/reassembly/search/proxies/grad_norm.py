"""grad_norm (Abdelfattah et al. 2021): how strongly the loss pulls on the weights of an untrained network.

Cross-entropy of the network (training mode, batch-norm batch statistics) on a target batch with its labels,
backpropagated; the score is the sum, over weight tensors (parameters with two or more dimensions: convolution,
linear and embedding weights; biases and norm scales are left out, as the original counted conv and linear weights
only), of the L2 norm of the gradient, averaged over the target batches.

**Sign and scale**: higher is better. A sum of gradient norms: it grows with the number of weight tensors, roughly
0.1 to 100 for the zoo's networks.

**Block term**: the same sum over the block's own weight tensors, while the block runs inside its own pretrained
model, followed by a fresh head for the target's classes, on the same batches; the network's score is exactly such
a sum over its parts, so the block terms are the block's share of it in the context it was trained in.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .common import Batch, parameter_owner


def grad_norm(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None
              ) -> tuple[float, list[float] | None]:
    """grad_norm of ``net`` averaged over ``batches``, and each part's share."""
    parts = list(parts or [])
    owner = parameter_owner(parts)
    net.train()
    weights = [p for p in net.parameters() if p.dim() >= 2 and p.requires_grad]
    total, terms = 0.0, [0.0] * len(parts)
    for images, labels in batches:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
        for weight in weights:
            if weight.grad is None:
                continue
            norm = float(weight.grad.norm())
            total += norm
            if id(weight) in owner:
                terms[owner[id(weight)]] += norm
    count = len(batches)
    return total / count, [t / count for t in terms] if parts else None
