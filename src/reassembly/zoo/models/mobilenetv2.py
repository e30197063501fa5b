"""MobileNetV2 (Sandler et al. 2018), torchvision-style, in the ImageNet layout and a 32x32 layout.

The 32x32 layout ("layout B" of the sandglass spec) only changes the stem to stride 1 and scales the final
1x1 conv with the width, so that it matches MobileNeXt-32 in parameters and MACs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import ClassifierHead, ConvBNAct, init_mobile_weights, make_divisible, register_mobile_widths

# (expansion t, output channels c, repeats n, first stride s)
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> depthwise 3x3 stride s (ReLU6) -> 1x1 project (linear); shortcut on the thin ends."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_channels * expansion))
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden), ConvBNAct(hidden, out_channels, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        stem_stride: int = 2,
        scale_head: bool = False,
        dropout: float = 0.2,
    ):
        super().__init__()
        channels = make_divisible(32 * width)
        last = make_divisible(1280 * width) if scale_head else make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvBNAct(3, channels, 3, stem_stride)]
        for t, c, n, s in STAGES:
            out = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNAct(channels, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = ClassifierHead(last, num_classes, dropout)
        init_mobile_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register_mobile_widths("mobilenetv2", MobileNetV2, "MobileNetV2",
                       "ImageNet layout (224x224, stem stride 2, 1280-wide last conv).",
                       "32x32 layout (stem stride 1, width-scaled last conv).")
