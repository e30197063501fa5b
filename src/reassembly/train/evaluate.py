"""Evaluate a classifier on a dataset: top-1, top-5 and mean cross-entropy, on one process or sharded over many."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import ImageDataset, Preprocess, normalization_of
from ..errors import ReassemblyError


@dataclass
class EvalResult:
    top1: float
    top5: float | None
    loss: float
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_normalization(model: nn.Module, mean, std) -> tuple[tuple, tuple]:
    """The explicit mean and std when given, else the ones the model carries (``reassembly.data.normalization_of``)."""
    if (mean is None) != (std is None):
        raise ReassemblyError("give both mean and std, or neither to use the model's own normalisation")
    return (tuple(mean), tuple(std)) if mean is not None else normalization_of(model)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, mean=None, std=None, batch_size: int = 256,
             device: str | torch.device = "cpu", progress: bool = True) -> EvalResult:
    """Accuracy of ``model`` on ``dataset`` in eval mode; logits must have one column per dataset class.

    ``mean``/``std`` default to the model's own normalisation. Under an initialised ``torch.distributed`` process
    group (``accelerate launch``, ``torchrun``) each process evaluates one shard and the counts are summed, so every
    process returns the result of the whole dataset; the model must then be the same on every process.
    """
    mean, std = resolve_normalization(model, mean, std)
    n = len(dataset)
    if n == 0:
        raise ReassemblyError(f"{dataset.name} has no images to evaluate")
    rank, world = _process_group()
    shard = dataset if world == 1 else dataset.subset(range(rank * n // world, (rank + 1) * n // world))
    model.eval().to(device)
    preprocess = Preprocess(mean, std)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, summed loss
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False)
    bar = tqdm(loader, desc=f"evaluating on {dataset.name}", unit="batch", disable=not progress or rank != 0,
               leave=False)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        logits = model(preprocess(images))
        if logits.shape[1] != dataset.num_classes:
            raise ReassemblyError(
                f"the model outputs {logits.shape[1]} classes but {dataset.name} has {dataset.num_classes}; "
                "build the model with the dataset's number of classes or pick the matching class subset"
            )
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.stack([(top[:, 0] == labels).sum().double(), (top == labels[:, None]).any(1).sum().double(),
                               F.cross_entropy(logits, labels, reduction="sum").double()])
    if world > 1:
        torch.distributed.all_reduce(totals)
    correct1, correct5, total_loss = totals.tolist()
    top5 = 100.0 * correct5 / n if dataset.num_classes > 5 else None
    return EvalResult(top1=100.0 * correct1 / n, top5=top5, loss=total_loss / n, images=n)


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
