"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, three stages of 16/32/64 channels.

Option-A shortcuts (subsample + zero-pad the channels, no parameters) so that state dicts match the widely used
third-party CIFAR-10 checkpoints once their ``module.`` prefix is stripped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model


class PadShortcut(nn.Module):
    """Parameter-free shortcut: take every ``stride``-th pixel and zero-pad the new channels on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            out_channels = width * 2**i
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, out_channels, stride if j == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _register(depth: int):
    def build(num_classes: int = 10, **kwargs) -> nn.Module:
        return CifarResNet(depth, num_classes, **kwargs)

    build.__name__ = f"cifar_resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}, option-A shortcuts, 16/32/64 channels, 32x32 input."
    return register_model(family="cifar_resnet")(build)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
