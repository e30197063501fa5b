"""Datasets as in-memory uint8 tensors, with class-subset views written like ``cifar10[5:10]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DatasetError
from . import sources

READERS = {
    "cifar10": sources.load_cifar10,
    "fashion_mnist": sources.load_fashion_mnist,
    "digits": sources.load_digits,
}
SPEC_PATTERN = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+|folder:.+?)(\[(?P<sel>[^\]]*)\])?$")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset name: the source and which of its classes (in the order given)."""

    name: str
    classes: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        match = SPEC_PATTERN.match(text.strip())
        if not match:
            raise DatasetError(f"cannot parse dataset {text!r}; write e.g. cifar10, cifar10[5:10], cifar10[0,2,4]")
        name, selection = match["name"], match["sel"]
        if not name.startswith("folder:") and name not in READERS:
            from ..errors import did_you_mean

            raise DatasetError(f"unknown dataset {name!r}{did_you_mean(name, READERS)} (the datasets: "
                               f"{', '.join(READERS)} or folder:PATH)")
        if selection is None:
            return cls(name)
        try:
            if ":" in selection:
                start, _, stop = selection.partition(":")
                classes = tuple(range(int(start or 0), int(stop)))
            else:
                classes = tuple(int(s) for s in selection.split(",") if s.strip())
        except ValueError:
            raise DatasetError(f"cannot parse the class selection [{selection}] in {text!r}; use [a:b] or [i,j,k]") from None
        if not classes:
            raise DatasetError(f"the class selection in {text!r} names no class; write e.g. {name}[0:5] or {name}[0,2]"
                               f", or {name} for every class")
        if len(set(classes)) != len(classes) or min(classes) < 0:
            raise DatasetError(f"the class selection in {text!r} must name distinct, non-negative classes")
        return cls(name, classes)

    def __str__(self) -> str:
        if self.classes is None:
            return self.name
        c = self.classes
        contiguous = list(c) == list(range(c[0], c[0] + len(c)))
        return f"{self.name}[{c[0]}:{c[-1] + 1}]" if contiguous else f"{self.name}[{','.join(map(str, c))}]"


class ImageDataset(Dataset):
    """Images as a uint8 tensor (N, C, H, W) with int64 labels 0..n-1 and the class names in label order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], name: str):
        self.images, self.labels, self.classes, self.name = images, labels, tuple(classes), name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> "ImageDataset":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.name)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {len(self)} images {self.image_size}, {self.num_classes} classes)"


def balanced_sample(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """``n`` images of ``dataset`` drawn with ``seed``, as evenly over the classes as they allow: every class gives
    ``n // classes`` or one more (a small class gives all it has and the others make up the rest), in split order."""
    if n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(dataset.num_classes)]
    pools = [pool for pool in pools if len(pool)]
    rank = np.concatenate([np.arange(len(pool)) for pool in pools])  # a class's k-th draw comes in round k
    tie = np.concatenate([np.full(len(pool), order) for pool, order in zip(pools, rng.permutation(len(pools)))])
    indices = np.concatenate(pools)[np.lexsort((tie, rank))[:n]]
    return dataset.subset(np.sort(indices))


def load_dataset(
    spec: str | DatasetSpec,
    split: str = "train",
    root=None,
    image_size: int | None = None,
    channels: int | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset by spec, e.g. ``load_dataset("cifar10[5:10]", "train", max_per_class=1000)``.

    Labels of a class subset are remapped to 0..n-1 in the order the spec lists the classes.
    ``image_size``/``channels`` resize and replicate (e.g. Fashion-MNIST as 32x32 RGB); ``max_per_class``
    keeps a seeded random sample of at most that many images of each class.
    """
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    if spec.name.startswith("folder:"):
        images, labels, classes = sources.load_image_folder(spec.name[len("folder:"):], split, image_size)
    else:
        images, labels, classes = READERS[spec.name](split, root)
    if spec.classes is not None:
        if max(spec.classes) >= len(classes):
            raise DatasetError(f"{spec} asks for class {max(spec.classes)} but {spec.name} has {len(classes)} classes")
        remap = np.full(len(classes), -1, np.int64)
        remap[list(spec.classes)] = np.arange(len(spec.classes))
        keep = remap[labels] >= 0
        images, labels = images[keep], remap[labels[keep]]
        classes = tuple(classes[c] for c in spec.classes)
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        chosen = [rng.permutation(np.flatnonzero(labels == c))[:max_per_class] for c in range(len(classes))]
        keep = np.sort(np.concatenate(chosen))
        images, labels = images[keep], labels[keep]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    tensor = _reshape(tensor, image_size, channels)
    return ImageDataset(tensor, torch.from_numpy(np.ascontiguousarray(labels)), classes, str(spec))


def _reshape(images: torch.Tensor, size: int | None, channels: int | None) -> torch.Tensor:
    if size is not None and tuple(images.shape[2:]) != (size, size):
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    if channels is not None and images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1).contiguous()
        elif channels == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            raise DatasetError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    return images
