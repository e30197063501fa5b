"""The evaluation network: a stack of the discrete cells a genotype describes, trained from scratch.

This is DARTS's CIFAR network. A stem (3x3 conv to 3C, BN), ``cells`` cells (the ones at depth L/3 and 2L/3 are
reduction cells that halve the resolution and double C), global average pooling and a linear classifier. Each cell
preprocesses its two inputs to C channels, computes every intermediate node as the sum of its two operations on
earlier nodes (the genotype's pairs), and concatenates the genotype's output nodes. Operations have affine batch
norms here. ``auxiliary=True`` adds DARTS's auxiliary classifier after the cell at depth 2L/3 (its logits come from
:meth:`NetworkCIFAR.forward_with_auxiliary`; ``forward`` returns the main logits only, so any classifier training loop
can train the network). DARTS's published parameter counts exclude the auxiliary head.

Drop path (DARTS's regulariser) zeroes whole operation outputs other than identities per sample with probability
``drop_path``; with ``drop_path_ramp`` = N training steps the probability grows linearly from 0 over the first N
steps, counted in a buffer (``steps_seen``) that is saved with the weights, so a resumed run continues the ramp.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ReassemblyError
from .genotypes import Genotype
from .operations import FactorizedReduce, ReLUConvBN, make_operation
from .search_network import reduction_layers


def drop_path(x: torch.Tensor, prob: float) -> torch.Tensor:
    """Zero each sample's tensor with probability ``prob``; scale the survivors by 1 / (1 - prob)."""
    keep = 1.0 - prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, channels: int, reduction: bool,
                 reduction_prev: bool, sg_reduction: int):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.indices = tuple(index for _, index in edges)
        self.ops = nn.ModuleList(
            make_operation(name, channels, 2 if reduction and index < 2 else 1, reduction=sg_reduction)
            for name, index in edges
        )
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(len(self.ops) // 2):
            total = 0
            for op, index in ((self.ops[2 * k], self.indices[2 * k]), (self.ops[2 * k + 1], self.indices[2 * k + 1])):
                h = op(states[index])
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """DARTS's auxiliary classifier for 8x8 maps: ReLU, 5x5 average pool (stride 3), 1x1 conv to 128, 2x2 conv to
    768, linear."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class NetworkCIFAR(nn.Module):
    """The network of ``genotype`` with ``cells`` cells and ``channels`` (C) channels in the first cells.

    ``sg_reduction`` overrides the genotype's sandglass reduction ratio t."""

    def __init__(self, genotype: Genotype, channels: int = 36, num_classes: int = 10, cells: int = 20,
                 auxiliary: bool = False, drop_path: float = 0.0, drop_path_ramp: int = 0, stem_multiplier: int = 3,
                 sg_reduction: int | None = None):
        super().__init__()
        if cells < 3:
            raise ReassemblyError(f"an evaluation network needs at least 3 cells (two of them reduce), got {cells}")
        if channels < 1 or num_classes < 1:
            raise ReassemblyError(f"channels and classes must be positive, got {channels} and {num_classes}")
        if not 0 <= drop_path < 1:
            raise ReassemblyError(f"drop-path probability must be in [0, 1), got {drop_path}")
        self.genotype, self.channels, self.num_classes, self.cells_count = genotype, channels, num_classes, cells
        self.sg_reduction = genotype.sg_reduction if sg_reduction is None else sg_reduction
        self.drop_path_prob, self.drop_path_ramp = drop_path, drop_path_ramp
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        self.auxiliary_after = reduction_layers(cells)[1]
        c_auxiliary = c_prev
        for i in range(cells):
            reduction = i in reduction_layers(cells)
            if reduction:
                c_curr *= 2
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, self.sg_reduction)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.auxiliary_after:
                c_auxiliary = c_prev
        self.auxiliary_head = AuxiliaryHeadCIFAR(c_auxiliary, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def current_drop_path(self) -> float:
        """The drop-path probability of the next training step."""
        if self.drop_path_prob == 0 or self.drop_path_ramp <= 0:
            return self.drop_path_prob
        return self.drop_path_prob * min(1.0, self.steps_seen.item() / self.drop_path_ramp)

    def forward_with_auxiliary(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main logits, and the auxiliary head's logits in training mode when the network has one (else None)."""
        drop_prob = 0.0
        if self.training:
            drop_prob = self.current_drop_path()
            self.steps_seen += 1
        auxiliary = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_prob)
            if i == self.auxiliary_after and self.auxiliary_head is not None and self.training:
                auxiliary = self.auxiliary_head(s1)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1)), auxiliary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_auxiliary(x)[0]

    def structure(self) -> dict:
        """What rebuilds this network (with :func:`network_from_structure`)."""
        return {"genotype": self.genotype.to_dict(), "channels": self.channels, "num_classes": self.num_classes,
                "cells": self.cells_count, "auxiliary": self.auxiliary_head is not None,
                "drop_path": self.drop_path_prob, "drop_path_ramp": self.drop_path_ramp,
                "sg_reduction": self.sg_reduction}


def network_from_structure(structure: dict, source: str = "network") -> NetworkCIFAR:
    genotype = Genotype.from_dict(structure["genotype"], source=f"{source}: genotype")
    kwargs = {k: structure[k] for k in ("channels", "num_classes", "cells", "auxiliary", "drop_path",
                                        "drop_path_ramp", "sg_reduction") if k in structure}
    return NetworkCIFAR(genotype, **kwargs)


def count_parameters(model: nn.Module, auxiliary: bool = False) -> int:
    """Parameters of a network, without the auxiliary head unless asked (as DARTS reports them)."""
    return sum(p.numel() for n, p in model.named_parameters() if auxiliary or not n.startswith("auxiliary_head."))
