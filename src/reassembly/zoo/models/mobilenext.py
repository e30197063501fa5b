"""The sandglass block and MobileNeXt (Zhou et al., ECCV 2020), in the ImageNet layout and a 32x32 layout.

``variant="official"`` builds what the authors' code builds (and what its parameter count of 3,535,416 at width
1.0 refers to): transition blocks drop one or both depthwise convs and the hidden width has a floor of about
out/6. ``variant="uniform"`` uses the paper's four-op block everywhere, for block-level studies.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._layers import ClassifierHead, ConvBNAct, init_mobile_weights, make_divisible, register_mobile_widths

# (reduction t, output channels c, repeats n, first stride s); n=3 for the 960 stage (the arXiv table's 2 is a typo)
STAGES = [(2, 96, 1, 2), (6, 144, 1, 1), (6, 192, 3, 2), (6, 288, 3, 2), (6, 384, 4, 1), (6, 576, 4, 2),
          (6, 960, 3, 1), (6, 1280, 1, 1)]


class SandGlass(nn.Module):
    """Depthwise 3x3 (ReLU6) -> 1x1 reduce (linear) -> 1x1 expand (ReLU6) -> depthwise 3x3 stride s (linear).

    The shortcut joins the wide tensors. ``identity_ratio`` (the paper's alpha) adds the shortcut to the first
    ``int(alpha * C)`` channels only; it is written with split/cat, never in place, so that autograd, export and
    dependency-graph pruning see an ordinary graph. ``drop_first_dw``/``drop_last_dw`` give the official code's
    transition-block shapes. ``affine=False`` takes the scale and shift out of every batch norm (the block as a
    DARTS search-time operation, ``reassembly.nas``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        reduction: int = 6,
        hidden: int | None = None,
        kernel_size: int = 3,
        identity_ratio: float = 1.0,
        shortcut: bool | None = None,
        drop_first_dw: bool = False,
        drop_last_dw: bool = False,
        affine: bool = True,
    ):
        super().__init__()
        if drop_last_dw and stride != 1:
            raise ValueError("a sandglass block without its last depthwise conv cannot have a stride")
        if not 0 < identity_ratio <= 1:
            raise ValueError(f"identity_ratio must be in (0, 1], got {identity_ratio}")
        hidden = in_channels // reduction if hidden is None else hidden
        layers: list[nn.Module] = []
        if not drop_first_dw:
            layers.append(ConvBNAct(in_channels, in_channels, kernel_size, 1, groups=in_channels, affine=affine))
        layers.append(ConvBNAct(in_channels, hidden, 1, act=None, affine=affine))
        layers.append(ConvBNAct(hidden, out_channels, 1, affine=affine))
        if not drop_last_dw:
            layers.append(ConvBNAct(out_channels, out_channels, kernel_size, stride, groups=out_channels, act=None,
                                    affine=affine))
        self.conv = nn.Sequential(*layers)
        can_add = stride == 1 and in_channels == out_channels
        self.use_shortcut = can_add if shortcut is None else shortcut
        if self.use_shortcut and not can_add:
            raise ValueError("a shortcut needs stride 1 and equal input and output channels")
        self.out_channels = out_channels
        self.identity_channels = int(out_channels * identity_ratio) if self.use_shortcut else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if not self.use_shortcut:
            return out
        k, rest = self.identity_channels, self.out_channels - self.identity_channels
        if rest == 0:  # plain ints, so that torch.fx traces through the block
            return out + x
        out_id, out_rest = torch.split(out, [k, rest], dim=1)
        x_id, _ = torch.split(x, [k, rest], dim=1)
        return torch.cat([out_id + x_id, out_rest], dim=1)


def official_hidden(in_channels: int, out_channels: int, reduction: int) -> int:
    """The official code's hidden width: in/t, raised to about out/6 (a multiple of 16) when that is smaller."""
    hidden = in_channels // reduction
    if hidden < out_channels / 6:
        hidden = make_divisible(math.ceil(out_channels / 6), 16)
    return hidden


def sandglass_for_stage(cin, cout, stride, reduction, first_in_stage, single_block, variant, identity_ratio):
    """One block of a MobileNeXt stage, shaped as ``variant`` prescribes."""
    if variant == "uniform":
        return SandGlass(cin, cout, stride, reduction, identity_ratio=identity_ratio)
    if variant != "official":
        raise ValueError(f"variant must be 'official' or 'uniform', got {variant!r}")
    hidden = official_hidden(cin, cout, reduction)
    keep_both_dw = reduction == 2 or cin == cout or (first_in_stage and single_block and stride == 1)
    if keep_both_dw:
        shortcut = cin == cout and stride == 1 and not (first_in_stage and single_block)
        return SandGlass(cin, cout, stride, reduction, hidden, identity_ratio=identity_ratio, shortcut=shortcut)
    # transition blocks: no first depthwise conv, and no last one either when the block does not downsample
    return SandGlass(cin, cout, stride, reduction, hidden, shortcut=False, drop_first_dw=True,
                     drop_last_dw=stride == 1)


class MobileNeXt(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        stem_stride: int = 2,
        scale_head: bool = False,
        variant: str = "official",
        identity_ratio: float = 1.0,
        dropout: float = 0.2,
    ):
        super().__init__()
        divisor = 4 if width <= 0.1 else 8
        channels = make_divisible(32 * width, divisor)
        features: list[nn.Module] = [ConvBNAct(3, channels, 3, stem_stride)]
        for index, (t, c, n, s) in enumerate(STAGES):
            is_last_stage = index == len(STAGES) - 1
            out = make_divisible(c * width, divisor)
            if is_last_stage and width < 1.0 and not scale_head:
                out = c  # the official builder keeps the 1280-wide last stage below width 1
            for i in range(n):
                features.append(
                    sandglass_for_stage(channels, out, s if i == 0 else 1, t, i == 0, n == 1, variant, identity_ratio)
                )
                channels = out
        self.features = nn.Sequential(*features)
        self.classifier = ClassifierHead(channels, num_classes, dropout)
        init_mobile_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register_mobile_widths("mobilenext", MobileNeXt, "MobileNeXt",
                       "ImageNet layout, official block shapes (kwargs variant, identity_ratio).",
                       "32x32 layout (stem stride 1, width-scaled last stage).")
