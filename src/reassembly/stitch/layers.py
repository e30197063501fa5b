"""Stitching layers: what joins the output of one block to the input of a block from another model.

A stitch is planned from two *ends*, the layout, width and grid of the tensor one block produces and of the one the
next block was trained on (:class:`End`, read off the node chains), and the actual size arriving at run time:

* map to map: BatchNorm, a convolution with kernel = stride = ``s``, LeakyReLU(0.1) (DeRy's adapter, whose conv has
  no bias: there the norm's shift, passed through the conv, is the only offset; least-squares initialisation put
  offsets of up to 18x the features' scale there, which the first optimiser steps on the conv then amplified until
  training diverged, so the offset is the conv's own bias here);
  ``s`` is the largest power of two not above the ratio of the arriving map's size to the size the next block was
  trained on, so the rule is deterministic (the official code draws the stride at random);
* tokens to tokens: LayerNorm, a linear map (with bias, likewise), LeakyReLU(0.1);
* map to tokens: the conv adapter, then the map's positions as tokens; tokens to map: the patch tokens (prefix
  tokens dropped) laid back on their grid, then the conv adapter;
* a class token the next block expects and the previous one does not give is a learned parameter; one it does not
  expect is dropped;
* a block that only runs at its trained size (its model read sizes from tensor shapes) gets an explicit resize
  (bilinear interpolation, or area averaging when shrinking), never a silent shape mismatch.

A :class:`StitchPlan` is plain data (it goes into the network's structure JSON); :class:`Stitch` builds the layers
from it, so a saved network is rebuilt without pickle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReassemblyError

NEGATIVE_SLOPE = 0.1
MAP_FORMATS = ("nchw", "nhwc")


class StitchError(ReassemblyError):
    """Two blocks that no stitch can join, or a stitch asked for something it cannot do."""


@dataclass(frozen=True)
class End:
    """One side of a block boundary: layout (``nchw``, ``nhwc``, ``tokens``, ...), width (channels or token
    dimension), spatial grid (map size, or the patch-token grid) and number of prefix (class) tokens."""

    format: str
    width: int
    grid: tuple[int, int] | None
    prefix_tokens: int = 0

    @property
    def is_map(self) -> bool:
        return self.format in MAP_FORMATS

    def describe(self) -> str:
        grid = "x".join(map(str, self.grid)) if self.grid else "?"
        if self.format == "tokens":
            return f"{self.width}-dim tokens on a {grid} grid" + (f" + {self.prefix_tokens} prefix" * bool(self.prefix_tokens))
        return f"{self.format} {self.width}x{grid}" if self.is_map else f"{self.format} of width {self.width}"


@dataclass(frozen=True)
class StitchPlan:
    """Everything needed to build one stitch; JSON-ready through :meth:`to_dict`."""

    kind: str  # conv | linear | identity
    source: End
    target: End
    stride: int = 1
    arriving_grid: tuple[int, int] | None = None  # the source grid actually arriving at this input size
    resize_to: tuple[int, int] | None = None  # explicit resize of the result to this grid
    class_token: bool = False  # prepend a learned prefix token

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> StitchPlan:
        def grid(value):
            return None if value is None else tuple(value)

        def end(value):
            return End(value["format"], value["width"], grid(value["grid"]), value["prefix_tokens"])

        return cls(record["kind"], end(record["source"]), end(record["target"]), record["stride"],
                   grid(record["arriving_grid"]), grid(record["resize_to"]), record["class_token"])

    def output_grid(self) -> tuple[int, int] | None:
        if self.resize_to is not None:
            return self.resize_to
        if self.arriving_grid is None:
            return None
        return (self.arriving_grid[0] // self.stride, self.arriving_grid[1] // self.stride)


def plan_stitch(source: End, target: End, arriving_grid: tuple[int, int] | None, fixed_size: bool,
                where: str = "") -> StitchPlan:
    """Choose the stitch from ``source`` (what the previous block gives, on ``arriving_grid`` at this input size)
    to ``target`` (what the next block was trained on). ``fixed_size``: the next block only runs at its trained
    grid. ``where`` names the pair in errors."""
    prefix = f"{where}: " if where else ""
    for end, side in ((source, "the previous block's output"), (target, "the next block's input")):
        if not (end.is_map or end.format == "tokens"):
            raise StitchError(
                f"{prefix}{side} is {end.describe()}, neither a feature map nor tokens, so no stitch can join it; "
                "a block must end before a model's head (pooling, classifier) and start after its stem"
            )
        if end.grid is None:
            raise StitchError(f"{prefix}{side} has no recorded spatial grid; dissect the model at a fixed input size")
    kind = "linear" if source.format == target.format == "tokens" else "conv"
    stride = 1
    if kind == "conv" and arriving_grid is not None:
        ratio = min(arriving_grid[0] / target.grid[0], arriving_grid[1] / target.grid[1])
        stride = 2 ** math.floor(math.log2(ratio)) if ratio >= 2 else 1
    plan = StitchPlan(kind, source, target, stride, arriving_grid, None,
                      target.format == "tokens" and target.prefix_tokens > 0 and source.format != "tokens")
    plan = _with_class_token(plan)
    grid = plan.output_grid()
    if grid is not None and grid != target.grid and fixed_size:
        plan = StitchPlan(plan.kind, source, target, stride, arriving_grid, target.grid, plan.class_token)
    if grid is not None and min(plan.output_grid()) < 1:
        raise StitchError(f"{prefix}the map would shrink below 1x1 ({arriving_grid} with stride {stride})")
    return plan


def _with_class_token(plan: StitchPlan) -> StitchPlan:
    """Tokens to tokens: add a learned class token when only the target has one (a source's is kept or dropped in
    :class:`Stitch`)."""
    if plan.kind == "linear" and plan.target.prefix_tokens > 0 and plan.source.prefix_tokens == 0:
        return StitchPlan(plan.kind, plan.source, plan.target, plan.stride, plan.arriving_grid, plan.resize_to, True)
    return plan


def identity_plan(end: End, arriving_grid: tuple[int, int] | None) -> StitchPlan:
    """No stitch: the next block continues the previous one's own model where it stopped."""
    return StitchPlan("identity", end, end, 1, arriving_grid)


class Stitch(nn.Module):
    """The layers of one :class:`StitchPlan`: layout changes around a BN+conv or LN+linear adapter."""

    def __init__(self, plan: StitchPlan):
        super().__init__()
        self.plan = plan
        source, target = plan.source, plan.target
        if plan.kind == "conv":
            self.norm = nn.BatchNorm2d(source.width)
            self.proj = nn.Conv2d(source.width, target.width, plan.stride, stride=plan.stride)
        elif plan.kind == "linear":
            self.norm = nn.LayerNorm(source.width)
            self.proj = nn.Linear(source.width, target.width)
        if plan.kind != "identity":
            self.act = nn.LeakyReLU(NEGATIVE_SLOPE)
        if plan.class_token:
            self.class_token = nn.Parameter(torch.zeros(1, target.prefix_tokens, target.width))

    def extra_repr(self) -> str:
        plan = self.plan
        return f"{plan.source.describe()} -> {plan.target.describe()}, stride {plan.stride}" + (
            f", resize to {plan.resize_to}" if plan.resize_to else "")

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's normalisation, projection and activation on the source's layout turned into the adapter's
        own (NCHW maps, or (batch, tokens, width)); without the final layout change. Least-squares initialisation
        fits ``proj`` between this method's pieces."""
        x = self.to_adapter(x)
        if self.plan.kind == "conv" and not self.training:  # BN folded into the conv: one pass over the map
            weight, bias = fold_norm_before(self.norm, self.proj.weight, self.proj.bias)
            return F.leaky_relu(F.conv2d(x, weight, bias, stride=self.plan.stride), NEGATIVE_SLOPE, inplace=True)
        return self.act(self.proj(self.norm(x)))

    def to_adapter(self, x: torch.Tensor) -> torch.Tensor:
        source, plan = self.plan.source, self.plan
        if plan.kind == "conv":
            if source.format == "tokens":
                return tokens_to_map(x, source, plan.arriving_grid)
            return x.permute(0, 3, 1, 2) if source.format == "nhwc" else x
        return _keep_prefix(x, source.prefix_tokens, self.plan.target.prefix_tokens)

    def from_adapter(self, y: torch.Tensor) -> torch.Tensor:
        plan, target = self.plan, self.plan.target
        if plan.resize_to is not None:
            y = resize(y, plan.resize_to, tokens=plan.kind == "linear", prefix=min(plan.source.prefix_tokens,
                                                                                    target.prefix_tokens))
        if plan.kind == "conv" and target.format == "tokens":
            y = y.flatten(2).transpose(1, 2)
        elif target.format == "nhwc":
            y = y.permute(0, 2, 3, 1)
        if plan.class_token:
            y = torch.cat([self.class_token.expand(y.shape[0], -1, -1), y], dim=1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.kind == "identity":
            return x
        return self.from_adapter(self.adapt(x))


def fold_norm_before(norm: nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Weight and bias of ``conv(norm(x))`` as one convolution, with ``norm`` in eval mode (its running
    statistics): ``norm`` scales channel c by a_c and shifts it by b_c, so the conv's weight scales by a along its
    input channels and its bias gains ``sum(weight * b)``."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return weight * scale[None, :, None, None], bias + (weight * shift[None, :, None, None]).sum(dim=(1, 2, 3))


def fold_norm_after(weight: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` (a conv without bias) as one convolution, ``norm`` in eval mode."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale


def tokens_to_map(x: torch.Tensor, source: End, grid: tuple[int, int] | None) -> torch.Tensor:
    h, w = grid or source.grid
    patches = x[:, source.prefix_tokens:]
    if patches.shape[1] != h * w:
        raise StitchError(f"expected {h}x{w} patch tokens after {source.prefix_tokens} prefix tokens, got "
                          f"{patches.shape[1]}")
    return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def _keep_prefix(x: torch.Tensor, have: int, want: int) -> torch.Tensor:
    """Tokens to tokens: drop prefix tokens the next block does not take (a learned one is added when it wants one
    the previous block lacks)."""
    return x[:, have:] if have and not want else x


def resize(y: torch.Tensor, grid: tuple[int, int], tokens: bool = False, prefix: int = 0) -> torch.Tensor:
    """Resize an NCHW map (or the patch tokens of a token sequence, keeping ``prefix`` tokens) to ``grid``:
    area averaging when shrinking by whole factors, bilinear interpolation otherwise."""
    if tokens:
        head, patches = y[:, :prefix], y[:, prefix:]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise StitchError(f"cannot lay {patches.shape[1]} tokens on a square grid to resize them")
        as_map = patches.transpose(1, 2).reshape(y.shape[0], y.shape[2], side, side)
        resized = resize(as_map, grid).flatten(2).transpose(1, 2)
        return torch.cat([head, resized], dim=1)
    h, w = y.shape[-2:]
    if h % grid[0] == 0 and w % grid[1] == 0:
        return F.avg_pool2d(y, (h // grid[0], w // grid[1]))
    return F.interpolate(y, size=grid, mode="bilinear", align_corners=False)


def grid_of(x: torch.Tensor, end: End) -> tuple[int, int] | None:
    """The spatial grid of a tensor laid out as ``end`` (for tokens, the recorded grid when the count fits, else
    the square grid)."""
    if end.format == "nchw":
        return tuple(x.shape[-2:])
    if end.format == "nhwc":
        return tuple(x.shape[1:3])
    if end.format == "tokens":
        patches = x.shape[1] - end.prefix_tokens
        if end.grid is not None and end.grid[0] * end.grid[1] == patches:
            return end.grid
        side = int(patches**0.5)
        if side * side != patches:
            raise StitchError(f"{patches} patch tokens do not lie on a square grid")
        return (side, side)
    return None
