"""Sample selection (MDA step 1): per class, the training images the model is most sure of.

Reads a classifier and a labelled :class:`~reassembly.data.ImageDataset` (the training split, no augmentation);
writes a :class:`SampleSelection`: for every class, the indices into the dataset of the ``per_class`` correctly
classified images with the highest softmax probability of their true label, best first. It is the input of
:func:`reassembly.lego.contribution.compute_contributions`.

The official code ranks by true-label probability without checking the prediction; here only correctly classified
images are eligible (the paper's "high-confidence samples"), and a class with fewer eligible images than asked for
keeps the ones it has instead of crashing. One batched forward pass over the dataset does the ranking.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..data import ImageDataset, Preprocess
from ..errors import ReassemblyError
from ..train.evaluate import resolve_normalization


@dataclass
class SampleSelection:
    """``indices[c]``: dataset indices of the chosen images of class ``c`` (best first); ``scores[c]`` their
    true-label probabilities. ``dataset`` names the dataset the indices refer to."""

    indices: list[list[int]]
    scores: list[list[float]]
    dataset: str

    @property
    def num_classes(self) -> int:
        return len(self.indices)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All chosen indices and their labels, class by class."""
        index = [i for chosen in self.indices for i in chosen]
        label = [c for c, chosen in enumerate(self.indices) for _ in chosen]
        return torch.tensor(index, dtype=torch.long), torch.tensor(label, dtype=torch.long)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "indices": self.indices, "scores": self.scores}

    @classmethod
    def from_dict(cls, data: dict) -> SampleSelection:
        return cls([list(map(int, c)) for c in data["indices"]], [list(map(float, c)) for c in data["scores"]],
                   str(data["dataset"]))


def per_class_count(class_sizes: list[int], per_class: int | None, fraction: float | None) -> list[int]:
    """How many images to choose per class: ``per_class`` each, or ``max(1, round(fraction * n_c))``."""
    if (per_class is None) == (fraction is None):
        raise ReassemblyError("give exactly one of per_class (images per class) and fraction (share of each class)")
    if per_class is not None:
        if per_class < 1:
            raise ReassemblyError(f"per_class must be at least 1, not {per_class}")
        return [per_class] * len(class_sizes)
    if not 0 < fraction <= 1:
        raise ReassemblyError(f"fraction must be in (0, 1], not {fraction}")
    return [max(1, round(fraction * n)) for n in class_sizes]


@torch.no_grad()
def select_samples(
    model: nn.Module,
    dataset: ImageDataset,
    per_class: int | None = 50,
    fraction: float | None = None,
    *,
    mean=None,
    std=None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    classes=None,
    _only=None,
) -> SampleSelection:
    """The most confident correctly classified images of every class of ``dataset`` (see the module docstring).

    The dataset's labels must be the model's output indices (load the full dataset, not a relabelled subset).
    ``mean``/``std`` default to the model's own normalisation. ``classes`` limits the work to some classes (only
    their images are run through the model; the other classes get no samples)."""
    if len(dataset) == 0:
        raise ReassemblyError(f"{dataset.name} has no images to select samples from")
    mean, std = resolve_normalization(model, mean, std)
    preprocess = Preprocess(mean, std)
    model.eval().to(device)
    if classes is not None:
        classes = sorted({int(c) for c in classes})
        if not classes or classes[0] < 0 or classes[-1] >= dataset.num_classes:
            raise ReassemblyError(f"classes {classes} must be a non-empty list of classes of {dataset.name} "
                                  f"(0..{dataset.num_classes - 1})")
        rows = torch.nonzero(torch.isin(dataset.labels.to(torch.long), torch.tensor(classes)))[:, 0]
        part = select_samples(model, dataset.subset(rows), per_class, fraction, mean=mean, std=std,
                              batch_size=batch_size, device=device, _only=classes)
        return SampleSelection([[int(rows[i]) for i in chosen] for chosen in part.indices], part.scores, part.dataset)
    labels = dataset.labels.to(torch.long)
    score = torch.empty(len(dataset), dtype=torch.float32)
    correct = torch.empty(len(dataset), dtype=torch.bool)
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start:start + batch_size].to(device)
        target = labels[start:start + batch_size].to(device)
        logits = model(preprocess(images)).float()
        if logits.ndim != 2 or logits.shape[1] != dataset.num_classes:
            raise ReassemblyError(
                f"the model outputs {tuple(logits.shape[1:])} per image but {dataset.name} has "
                f"{dataset.num_classes} classes; sample selection needs one logit per dataset class"
            )
        prob = logits.softmax(1).gather(1, target[:, None])[:, 0]
        score[start:start + len(target)] = prob.cpu()
        correct[start:start + len(target)] = (logits.argmax(1) == target).cpu()
    sizes = torch.bincount(labels, minlength=dataset.num_classes).tolist()
    wanted = per_class_count(sizes, per_class, fraction)
    indices, scores = [], []
    for c in range(dataset.num_classes):
        if _only is not None and c not in _only:
            indices.append([])
            scores.append([])
            continue
        eligible = torch.nonzero((labels == c) & correct)[:, 0]
        if len(eligible) == 0:
            raise ReassemblyError(
                f"class {c} ({dataset.classes[c]}) of {dataset.name} has no correctly classified image; the model "
                "cannot be disassembled for it (check the dataset's labels and the model's normalisation)"
            )
        if len(eligible) < wanted[c]:
            warnings.warn(f"class {c} of {dataset.name}: only {len(eligible)} correctly classified images, "
                          f"fewer than the {wanted[c]} asked for; using those", stacklevel=2)
        top = score[eligible].topk(min(wanted[c], len(eligible)))
        indices.append(eligible[top.indices].tolist())
        scores.append(top.values.tolist())
    return SampleSelection(indices, scores, dataset.name)
