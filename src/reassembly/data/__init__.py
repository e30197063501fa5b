"""Datasets ("cifar10", "cifar10[5:10]", "fashion_mnist", "digits", "folder:PATH") and batch preprocessing."""

from .dataset import DatasetSpec, ImageDataset, balanced_sample, load_dataset
from .sources import cache_dir, data_roots
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    normalization_of,
    normalize,
    random_crop_flip,
    set_normalization,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DatasetSpec", "ImageDataset", "Preprocess", "balanced_sample", "cache_dir", "data_roots",
           "load_dataset", "normalization_of", "normalize", "random_crop_flip", "set_normalization"]
