"""Datasets ("cifar10", "cifar10[5:10]", "fashion_mnist", "digits", "folder:PATH") and batch preprocessing."""

from .dataset import DatasetSpec, ImageDataset, load_dataset
from .sources import cache_dir, data_roots
from .transforms import Preprocess, normalize, random_crop_flip

__all__ = ["DatasetSpec", "ImageDataset", "Preprocess", "cache_dir", "data_roots", "load_dataset", "normalize",
           "random_crop_flip"]
