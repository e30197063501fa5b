"""VGG with batch norm for 32x32 images: five max-pools take 32 px to 1 px, then an MLP classifier.

``width`` scales every conv layer (the zoo ships narrow VGGs to keep the weights small); ``hidden`` gives the
widths of the classifier's hidden layers (``()`` for a single linear layer).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..registry import register_model

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0, hidden=(512, 512), dropout=0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(8, int(round(item * width)))
                layers += [nn.Conv2d(channels, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        for h in hidden:
            head += [nn.Linear(channels, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            channels = h
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model(family="vgg")
def cifar_vgg11_bn(num_classes: int = 10, **kwargs) -> nn.Module:
    """VGG-11 with batch norm for 32x32 input; kwargs width, hidden, dropout."""
    return VGG(11, num_classes, **kwargs)


@register_model(family="vgg")
def cifar_vgg16_bn(num_classes: int = 10, **kwargs) -> nn.Module:
    """VGG-16 with batch norm for 32x32 input; kwargs width, hidden, dropout."""
    return VGG(16, num_classes, **kwargs)
