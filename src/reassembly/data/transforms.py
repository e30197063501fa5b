"""Batch-level preprocessing: normalisation and the usual CIFAR augmentation, vectorised over the batch.

A model carries the normalisation it expects (``set_normalization``), so training, evaluation and feature
extraction read it from the model instead of looking the model up in a registry.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def set_normalization(model: nn.Module, mean, std) -> nn.Module:
    """Record on ``model`` the per-channel mean and std of the [0, 1] pixels it expects; returns the model."""
    model.input_normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return model


def normalization_of(model: nn.Module, metadata: dict | None = None) -> tuple[tuple, tuple]:
    """Mean and std ``model`` expects: from checkpoint ``metadata``, else the model's own record
    (``set_normalization``), else timm's ``pretrained_cfg``, else ImageNet's."""
    for source in (metadata or {}, getattr(model, "input_normalization", None), getattr(model, "pretrained_cfg", None)):
        if isinstance(source, dict) and "mean" in source and "std" in source:
            return tuple(source["mean"]), tuple(source["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    x = images.float().div_(255)
    channels = x.shape[1]
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:channels].view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:channels].view(1, -1, 1, 1)
    return (x - mean) / std


def random_crop_flip(images: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random crop of the original size from a zero-padded copy, then a random horizontal flip, per image.

    ``part=(i, k)``: ``images`` is the i-th of k equal parts of a batch (one per process); the random draws are made
    for the whole batch and this part's are applied, so k processes augment a batch as one process would.
    """
    n, _c, h, w = images.shape
    index, count = part
    mine = slice(index * n, (index + 1) * n)
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n * count,), generator=generator)[mine].to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (n * count,), generator=generator)[mine].to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(n * count, generator=generator)[mine] < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


class Preprocess:
    """What a model needs done to a uint8 batch: optional augmentation, then normalisation.

    ``part=(i, k)``: the batches are the i-th of k equal parts of each global batch (see ``random_crop_flip``).
    """

    def __init__(self, mean, std, augment: bool = False, padding: int = 4, flip: bool = True,
                 generator: torch.Generator | None = None, part: tuple[int, int] = (0, 1)):
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.padding, self.flip, self.generator, self.part = augment, padding, flip, generator, part

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment:
            images = random_crop_flip(images, self.padding, self.flip, self.generator, self.part)
        return normalize(images, self.mean, self.std)
