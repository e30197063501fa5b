"""Evaluate a classifier on a dataset: top-1, top-5 and mean cross-entropy."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import ImageDataset, Preprocess
from .errors import ReassemblyError


@dataclass
class EvalResult:
    top1: float
    top5: float | None
    loss: float
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def normalization_of(model: nn.Module, metadata: dict | None = None) -> tuple[tuple, tuple]:
    """Mean and std the model expects: checkpoint metadata, else the model's registry entry, else ImageNet's."""
    from .zoo.registry import IMAGENET_MEAN, IMAGENET_STD, model_info

    metadata = metadata or {}
    if "mean" in metadata and "std" in metadata:
        return tuple(metadata["mean"]), tuple(metadata["std"])
    cfg = getattr(model, "pretrained_cfg", None)  # timm models carry their own
    if isinstance(cfg, dict) and "mean" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    name = getattr(model, "reassembly_name", None)
    if name and not name.startswith("timm:"):
        info = model_info(name)
        return info.mean, info.std
    return IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, mean, std, batch_size: int = 256,
             device: str | torch.device = "cpu", progress: bool = True) -> EvalResult:
    """Accuracy of ``model`` on ``dataset`` in eval mode; logits must have one column per dataset class."""
    model.eval().to(device)
    preprocess = Preprocess(mean, std)
    correct1 = correct5 = 0
    total_loss = 0.0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    bar = tqdm(loader, desc=f"evaluating on {dataset.name}", unit="batch", disable=not progress, leave=False)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        logits = model(preprocess(images))
        if logits.shape[1] != dataset.num_classes:
            raise ReassemblyError(
                f"the model outputs {logits.shape[1]} classes but {dataset.name} has {dataset.num_classes}; "
                "build the model with the dataset's number of classes or pick the matching class subset"
            )
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(1).sum().item()
    n = len(dataset)
    if n == 0:
        raise ReassemblyError(f"{dataset.name} has no images to evaluate")
    top5 = 100.0 * correct5 / n if dataset.num_classes > 5 else None
    return EvalResult(top1=100.0 * correct1 / n, top5=top5, loss=total_loss / n, images=n)
