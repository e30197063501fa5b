"""Per-block objective terms of the 0-1 program, measured once per zoo model.

A zoo model runs as its own stem nodes, then its partition blocks (the *parts* whose terms are wanted), then a fresh
head for the target's classes (global pooling and a linear layer, as an assembled network's head, initialised from
the seed): :class:`SourceNet`. The proxy scores it on the target batches (normalised as that model was trained) and
attributes what it measures to the blocks (see each proxy's module for its block term). A first block that keeps
its model's own stem gets the term of the block it extends. Every block thus gets a
term measured in the context it was trained in, one forward pass per model and batch, instead of one per candidate
network; the program adds the terms of the blocks it picks.

A term that is not finite (NASWOT's ``-inf`` for a kernel that is singular, a proxy's NaN) would make the program
meaningless, so it is replaced by the worst finite term of that position minus the spread of the finite ones (or by
0 when none is finite); the replacements are listed in the report.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.transforms import normalize
from ..stitch.net import Head, HeadPlan, output_end
from .proxies import Proxy, ProxyError
from .space import SearchSpace, SourceModel


class SourceNet(nn.Module):
    """A zoo model as stem nodes -> its blocks ``ranges`` (consecutive chain ranges) -> a fresh linear head."""

    def __init__(self, source: SourceModel, ranges: list[tuple[int, int]], num_classes: int):
        super().__init__()
        chain = source.chain
        first, last = ranges[0][0], ranges[-1][1]
        self.stem = chain[0:first] if first > 0 else nn.Identity()
        self.blocks = nn.ModuleList(chain[start:stop] for start, stop in ranges)
        self.head = Head(HeadPlan(output_end(chain, last), num_classes, "mean"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def normalised(batches: list[tuple[torch.Tensor, torch.Tensor]], mean, std) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(normalize(images, mean, std), labels) for images, labels in batches]


def block_terms(space: SearchSpace, proxy: Proxy, batches: dict[tuple, list], seed: int = 0
                ) -> tuple[list[list[float]], list[str]]:
    """The proxy's term for every candidate (per position, in the problem's order), times the proxy's sign so that
    larger is better, and the notes on replaced terms. ``batches[input_size]`` holds the raw (uint8) target batches
    at each model input size."""
    by_model: dict[str, list[tuple[int, int]]] = {}
    own_stem: dict[str, str] = {}  # a first block with its model's own stem -> the block it extends (same term)
    for position in space.candidates:
        for candidate in position:
            base = next((c for c in space.candidates[0] if c.model == candidate.model and c.stop == candidate.stop
                         and c.start > candidate.start), None) if candidate.position == 0 else None
            if base is not None:
                own_stem[candidate.spec] = base.spec
                continue
            by_model.setdefault(candidate.model, []).append((candidate.start, candidate.stop))
    measured: dict[str, float] = {}
    for name, ranges in by_model.items():
        source = space.sources[name]
        torch.manual_seed(seed)
        net = SourceNet(source, ranges, space.num_classes)
        mean, std = source.normalization()
        terms = proxy.block_terms(net, normalised(batches[source.input_size], mean, std), list(net.blocks), seed)
        if terms is None:
            raise ProxyError(f"proxy {proxy.name} gave no block terms for {name}")
        for (start, stop), term in zip(ranges, terms):
            measured[f"{name}:{start}-{stop}"] = term
    measured.update({variant: measured[base] for variant, base in own_stem.items()})
    terms, notes = [], []
    for position in space.candidates:
        values = [proxy.sign * measured[c.spec] for c in position]
        finite = [v for v in values if math.isfinite(v)]
        floor = (min(finite) - (max(finite) - min(finite) or 1.0)) if finite else 0.0
        for candidate, value in zip(position, values):
            if not math.isfinite(value):
                notes.append(f"{candidate.spec}: block term {value} replaced by {floor:.4g}")
        terms.append([v if math.isfinite(v) else floor for v in values])
    return terms, notes
