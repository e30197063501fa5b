"""Small building blocks shared by several families."""

from __future__ import annotations

import torch.nn as nn

from ..registry import register_model

MOBILE_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10% (MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional activation; ``act=None`` keeps the output linear.

    ``affine=False`` gives the batch norm no scale and shift (as DARTS's search-time operations have)."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU6,
                 affine: bool = True):
        layers = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, affine=affine),
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


def register_mobile_widths(family: str, builder, label: str, imagenet_doc: str, cifar_doc: str) -> None:
    """Register ``<family>_<width%>`` (ImageNet layout) and ``cifar_<family>_<width%>`` (32x32 layout: stem stride 1,
    width-scaled last stage) for every width in ``MOBILE_WIDTHS``; ``builder(num_classes, width, **kwargs)``."""
    for width in MOBILE_WIDTHS:
        tag = f"{int(round(width * 100)):03d}"

        def imagenet(num_classes: int = 1000, _width=width, **kwargs) -> nn.Module:
            return builder(num_classes, _width, **kwargs)

        def cifar(num_classes: int = 10, _width=width, **kwargs) -> nn.Module:
            kwargs.setdefault("stem_stride", 1)
            kwargs.setdefault("scale_head", True)
            return builder(num_classes, _width, **kwargs)

        imagenet.__name__, imagenet.__doc__ = f"{family}_{tag}", f"{label} x{width}, {imagenet_doc}"
        cifar.__name__, cifar.__doc__ = f"cifar_{family}_{tag}", f"{label} x{width}, {cifar_doc}"
        register_model(family=family, input_size=(3, 224, 224), num_classes=1000)(imagenet)
        register_model(family=family)(cifar)
