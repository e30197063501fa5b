"""The DARTS search network: cells whose every edge is a softmax-weighted mixture of all candidate operations.

A cell has two inputs (the outputs of the two previous cells, brought to C channels by a 1x1 ReLU-conv-BN, or by a
factorized reduction when the previous cell halved the resolution), ``steps`` intermediate nodes that each sum one
mixed edge from every earlier node, and an output that concatenates the last ``multiplier`` nodes. With 4 nodes a
cell has 2 + 3 + 4 + 5 = 14 edges. The cells at depth L/3 and 2L/3 are reduction cells: their edges from the inputs
have stride 2 and C doubles. All normal cells share one architecture tensor ``alphas_normal`` (edges x operations),
all reduction cells ``alphas_reduce``. Batch norms have no affine parameters and pools are followed by a batch norm,
as in DARTS, so that the mixture weights cannot be absorbed into the operations' scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReassemblyError
from .genotypes import Genotype, derive_genotype
from .operations import (
    DEFAULT_REDUCTION,
    FactorizedReduce,
    ReLUConvBN,
    Zero,
    make_operation,
    search_space,
)

ARCH_PARAMETERS = ("alphas_normal", "alphas_reduce")


class MixedOp(nn.Module):
    """Every candidate operation on one edge; the output is their sum weighted by the edge's softmax weights."""

    def __init__(self, channels: int, stride: int, primitives: tuple[str, ...], reduction: int):
        super().__init__()
        ops = []
        for name in primitives:
            op = make_operation(name, channels, stride, affine=False, reduction=reduction)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)
        # ``none`` adds weight * 0 to the sum and nothing to any gradient: skip computing it
        self.active = tuple(i for i, op in enumerate(ops) if not isinstance(op, Zero))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(weights[i] * self.ops[i](x) for i in self.active)


class SearchCell(nn.Module):
    def __init__(self, steps: int, multiplier: int, c_prev_prev: int, c_prev: int, channels: int, reduction: bool,
                 reduction_prev: bool, primitives: tuple[str, ...], sg_reduction: int):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and j < 2 else 1, primitives, sg_reduction)
            for i in range(steps) for j in range(i + 2)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[-self.multiplier:], dim=1)


def reduction_layers(cells: int) -> tuple[int, int]:
    """The depths of the two reduction cells: L/3 and 2L/3 (rounded down)."""
    return cells // 3, 2 * cells // 3


class SearchNetwork(nn.Module):
    """Stem (3x3 conv to 3C, BN), ``cells`` search cells, global pool and a linear classifier.

    ``space`` names the candidate operations (``darts``, ``extend``, ``replace``); ``sg_reduction`` is the sandglass
    operations' reduction ratio t. The architecture parameters are the two module parameters named in
    ``ARCH_PARAMETERS``; :meth:`weights` lists all the others."""

    def __init__(self, channels: int = 16, num_classes: int = 10, cells: int = 8, space: str = "darts",
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 sg_reduction: int = DEFAULT_REDUCTION):
        super().__init__()
        if cells < 3:
            raise ReassemblyError(f"a search network needs at least 3 cells (one normal, two reduction), got {cells}")
        if channels < 1 or num_classes < 1:
            raise ReassemblyError(f"channels and classes must be positive, got {channels} and {num_classes}")
        self.primitives = search_space(space)
        self.space, self.channels, self.num_classes, self.cells_count = space, channels, num_classes, cells
        self.steps, self.multiplier, self.sg_reduction = steps, multiplier, sg_reduction
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(cells):
            reduction = i in reduction_layers(cells)
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(steps, multiplier, c_prev_prev, c_prev, c_curr, reduction, reduction_prev,
                                         self.primitives, sg_reduction))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        edges = sum(range(2, steps + 2))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(edges, len(self.primitives)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(self.primitives)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normal, reduce = F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, reduce if cell.reduction else normal)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def named_weights(self) -> list[tuple[str, nn.Parameter]]:
        """The network weights w: every parameter except the architecture parameters."""
        return [(n, p) for n, p in self.named_parameters() if n not in ARCH_PARAMETERS]

    def weights(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weights()]

    def alphas(self) -> dict[str, list[list[float]]]:
        """The softmax operation weights of both cell types, as nested lists (edges x operations)."""
        return {"normal": F.softmax(self.alphas_normal.detach(), dim=-1).cpu().tolist(),
                "reduce": F.softmax(self.alphas_reduce.detach(), dim=-1).cpu().tolist()}

    def genotype(self) -> Genotype:
        return derive_genotype(self.alphas_normal, self.alphas_reduce, self.primitives, self.steps,
                               self.multiplier, self.sg_reduction)
