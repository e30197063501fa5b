"""Batch-level preprocessing: normalisation and the usual CIFAR augmentation, vectorised over the batch."""

from __future__ import annotations

import torch


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    x = images.float().div_(255)
    channels = x.shape[1]
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:channels].view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:channels].view(1, -1, 1, 1)
    return (x - mean) / std


def random_crop_flip(images: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the original size from a zero-padded copy, then a random horizontal flip, per image."""
    n, _c, h, w = images.shape
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


class Preprocess:
    """What a model needs done to a uint8 batch: optional augmentation, then normalisation."""

    def __init__(self, mean, std, augment: bool = False, padding: int = 4, flip: bool = True,
                 generator: torch.Generator | None = None):
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.padding, self.flip, self.generator = augment, padding, flip, generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment:
            images = random_crop_flip(images, self.padding, self.flip, self.generator)
        return normalize(images, self.mean, self.std)
