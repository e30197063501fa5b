"""Wide ResNets for 32x32 images (Zagoruyko & Komodakis 2016): pre-activation blocks, 1x1 projection shortcuts."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        channels = widths[0]
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(channels, widths[i + 1], stride if j == 0 else 1, dropout))
                channels = widths[i + 1]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.linear(torch.flatten(self.pool(x), 1))


@register_model(family="wide_resnet")
def cifar_wrn16_2(num_classes: int = 10, **kwargs) -> nn.Module:
    """Wide ResNet-16-2 for 32x32 input (0.7M parameters)."""
    return WideResNet(16, 2, num_classes, **kwargs)


@register_model(family="wide_resnet")
def cifar_wrn16_4(num_classes: int = 10, **kwargs) -> nn.Module:
    """Wide ResNet-16-4 for 32x32 input (2.7M parameters)."""
    return WideResNet(16, 4, num_classes, **kwargs)


@register_model(family="wide_resnet")
def cifar_wrn28_10(num_classes: int = 10, **kwargs) -> nn.Module:
    """Wide ResNet-28-10 for 32x32 input (36M parameters)."""
    return WideResNet(28, 10, num_classes, **kwargs)
