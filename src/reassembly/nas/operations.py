"""The candidate operations of a DARTS cell edge, and the named search spaces that choose among them.

Every operation maps C channels to C channels at the edge's stride (1, or 2 on the edges that leave a reduction
cell's inputs). ``affine=False`` is the search-time form (batch norms without scale and shift, as DARTS searches);
the evaluation network builds the same operations with ``affine=True``.

The eight DARTS operations are ``none`` (a zero), ``max_pool_3x3``, ``avg_pool_3x3``, ``skip_connect`` (identity, or
:class:`FactorizedReduce` at stride 2), ``sep_conv_3x3/5x5`` ((ReLU, depthwise kxk, 1x1, BN) twice, the stride on the
first depthwise conv) and ``dil_conv_3x3/5x5`` (ReLU, depthwise kxk with dilation 2, 1x1, BN).

The sandglass operations ``sg_3x3`` and ``sg_5x5`` are the library's own sandglass block
(:class:`reassembly.zoo.models.mobilenext.SandGlass`) from C to C channels with the given depthwise kernel: depthwise
kxk (ReLU6), 1x1 down to C // t (linear), 1x1 back to C (ReLU6), depthwise kxk at the edge's stride (linear). It has
no internal shortcut: the edges of a cell are summed into its nodes and ``skip_connect`` is an operation of its own.
The reduction ratio t is a parameter (default 2: at the search width C = 16, t = 6 would leave 2 hidden channels).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ReassemblyError
from ..zoo.models.mobilenext import SandGlass

DARTS_PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                    "dil_conv_3x3", "dil_conv_5x5")
SANDGLASS_PRIMITIVES = ("sg_3x3", "sg_5x5")

# darts: the DARTS paper's 8 operations. extend: those plus the two sandglass operations (10). replace: the
# separable convolutions swapped for sandglass operations of the same kernel (8); the spec (section 3.2) offers both
# readings of the MobileNeXt paper's unread DARTS experiment.
SEARCH_SPACES: dict[str, tuple[str, ...]] = {
    "darts": DARTS_PRIMITIVES,
    "extend": DARTS_PRIMITIVES + SANDGLASS_PRIMITIVES,
    "replace": tuple({"sep_conv_3x3": "sg_3x3", "sep_conv_5x5": "sg_5x5"}.get(p, p) for p in DARTS_PRIMITIVES),
}
DEFAULT_REDUCTION = 2


def search_space(name: str) -> tuple[str, ...]:
    """The operation names of a named search space, ``none`` first."""
    try:
        return SEARCH_SPACES[name]
    except KeyError:
        raise ReassemblyError(f"unknown search space {name!r}; choose one of {', '.join(SEARCH_SPACES)}") from None


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output's shape (every ``stride``-th pixel at a stride)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv (no bias) -> BN: DARTS's cell-input preprocessing."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(cout, affine=affine))


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two stride-2 1x1 convs, one offset by a pixel, concatenated."""

    def __init__(self, cin: int, cout: int, affine: bool = True):
        super().__init__()
        if cout % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {cout}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(cin, cout // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(cin, cout // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class DilConv(nn.Sequential):
    """ReLU -> depthwise kxk (dilated) -> 1x1 -> BN."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(cin, cin, kernel_size, stride, padding, dilation=dilation, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout, affine=affine),
        )


class SepConv(nn.Sequential):
    """A depthwise-separable conv applied twice; only the first carries the stride."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(cin, cin, kernel_size, stride, padding, 1, affine),
            DilConv(cin, cout, kernel_size, 1, padding, 1, affine),
        )


def _pool(kind: str, stride: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


def _skip(channels: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels, affine)


def _sandglass(kernel_size: int, channels: int, stride: int, affine: bool, reduction: int) -> nn.Module:
    if channels // reduction < 1:
        raise ReassemblyError(f"a sandglass operation on {channels} channels with reduction t={reduction} would have "
                              "no hidden channels; lower t or widen the network")
    return SandGlass(channels, channels, stride, reduction, kernel_size=kernel_size, shortcut=False, affine=affine)


# name -> builder(channels, stride, affine, reduction)
OPERATIONS = {
    "none": lambda c, s, affine, t: Zero(s),
    "max_pool_3x3": lambda c, s, affine, t: _pool("max", s),
    "avg_pool_3x3": lambda c, s, affine, t: _pool("avg", s),
    "skip_connect": lambda c, s, affine, t: _skip(c, s, affine),
    "sep_conv_3x3": lambda c, s, affine, t: SepConv(c, c, 3, s, 1, affine),
    "sep_conv_5x5": lambda c, s, affine, t: SepConv(c, c, 5, s, 2, affine),
    "dil_conv_3x3": lambda c, s, affine, t: DilConv(c, c, 3, s, 2, 2, affine),
    "dil_conv_5x5": lambda c, s, affine, t: DilConv(c, c, 5, s, 4, 2, affine),
    "sg_3x3": lambda c, s, affine, t: _sandglass(3, c, s, affine, t),
    "sg_5x5": lambda c, s, affine, t: _sandglass(5, c, s, affine, t),
}


def make_operation(name: str, channels: int, stride: int, affine: bool = True,
                   reduction: int = DEFAULT_REDUCTION) -> nn.Module:
    """Build the operation ``name`` from ``channels`` to ``channels`` at ``stride``.

    ``reduction`` is the sandglass operations' t (ignored by the others)."""
    try:
        builder = OPERATIONS[name]
    except KeyError:
        raise ReassemblyError(f"unknown operation {name!r}; the operations are {', '.join(OPERATIONS)}") from None
    return builder(channels, stride, affine, reduction)


__all__ = ["DARTS_PRIMITIVES", "DEFAULT_REDUCTION", "OPERATIONS", "SANDGLASS_PRIMITIVES", "SEARCH_SPACES", "DilConv",
           "FactorizedReduce", "ReLUConvBN", "SepConv", "Zero", "make_operation", "search_space"]
