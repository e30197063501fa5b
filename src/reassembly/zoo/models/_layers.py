"""Small building blocks shared by several families."""

from __future__ import annotations

import torch.nn as nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10% (MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional activation; ``act=None`` keeps the output linear."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU6):
        layers = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def init_mobile_weights(model: nn.Module) -> None:
    """Official MobileNet-family init: fan-out He convs, BN (1, 0), Linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class ClassifierHead(nn.Sequential):
    """Global average pool -> flatten -> dropout -> linear: the head every CNN here shares."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(in_features, num_classes),
        )
