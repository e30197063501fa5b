"""Threshold calibration: the most compressive alpha/beta whose component keeps the original's accuracy on held-out
**training** images.

MDA's thresholds (conv 0.3/0.2, linear 0.4/0.3) were tuned on the paper's wide VGG-16; on narrower or residual
networks they remove so much that the component loses tens of points (``docs/lego.md``). Instead of guessing milder
thresholds, :func:`calibrate_thresholds` locates the component for every point of a grid (one set of contributions,
no new data pass), orders the candidates by their parameter count (then MACs), and evaluates them, cheapest first,
by masking the full model (every dropped input channel of every conv/linear zeroed, the head restricted to the
classes; exactly what extraction computes, see ``tests/test_lego.py``) on held-out training images of the chosen
classes: images that were not among the contribution samples. The first candidate whose accuracy is at least the
original's on the same images, with its argmax restricted to the same classes, minus ``tolerance`` points, is
chosen.

If no grid point is accurate enough, the most accurate one is repaired layer by layer (``restore``): each layer it
prunes is scored alone (only that layer's dropped inputs zeroed), and the layers whose pruning alone costs held-out
accuracy are restored whole (:func:`~reassembly.lego.locate.locate_component`'s ``keep_whole``), the costliest
first, until the component reaches the target. MDA's thresholds are global, but what a dropped channel costs is
not: on ``vgg16_cifar10`` one early layer loses most of what the whole component loses (``docs/lego.md``). If that
does not reach the target either, the most accurate candidate tried (the cheapest among equals) is chosen, ``met`` is
False and a warning says so. The test split is never touched.

``match_loss`` also asks that the component's held-out cross-entropy over the classes be no worse than the
original's. A model fits its own training images almost perfectly (``vgg16_cifar10``: 31 errors in 14,100), so
held-out accuracy moves by a handful of images and cannot tell a faithful component from a lucky one; the loss moves
with every logit. Restoration then orders every pruned layer by what pruning it alone costs in loss and restores
them one by one until both hold; restoring them all gives the head-only component, whose restricted logits are the
original's, so the target is always met (at worst with little compression).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset, Preprocess
from ..errors import ReassemblyError
from ..train.evaluate import resolve_normalization
from .contribution import Contributions
from .locate import ALPHA, BETA, ComponentMasks, channel_graph, locate_component
from .report import logits_in_batches

#: (alpha, beta) pairs tried per layer kind; every conv pair is combined with every linear pair. The first pairs are
#: the paper's thresholds.
GRID = {
    "conv": [(0.3, 0.2), (0.2, 0.1), (0.1, 0.1), (0.1, 0.0), (0.05, 0.0), (0.0, 0.0)],
    "linear": [(0.4, 0.3), (0.2, 0.1), (0.1, 0.1), (0.1, 0.0), (0.0, 0.0)],
}


@dataclass
class Calibration:
    """The chosen component and everything tried. ``tried`` rows: alpha, beta, params/macs (counted from the masks:
    conv/linear weights and biases, batch-norm affine), ``accuracy`` on the held-out images (None: not evaluated,
    a cheaper candidate already met the target), ``same_as`` (the cheaper candidate with identical masks) and
    ``kept_whole`` (layers restored whole; empty for grid points), ``loss`` (held-out cross-entropy over the classes).
    ``layer_costs`` / ``layer_loss_costs``: when the grid fell short, the held-out accuracy points each layer of the
    best grid point loses / the cross-entropy it adds when it alone is pruned."""

    masks: ComponentMasks
    met: bool
    original_accuracy: float
    target: float
    held_out_images: int
    chosen: int
    tried: list[dict] = field(default_factory=list)
    layer_costs: dict[str, float] = field(default_factory=dict)
    original_loss: float | None = None
    match_loss: bool = False
    layer_loss_costs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"met": self.met, "original_accuracy": self.original_accuracy, "target": self.target,
                "original_loss": self.original_loss, "match_loss": self.match_loss,
                "held_out_images": self.held_out_images, "chosen": self.chosen,
                "alpha": self.masks.alpha, "beta": self.masks.beta, "kept_whole": self.masks.kept_whole,
                "tried": self.tried, "layer_costs": self.layer_costs, "layer_loss_costs": self.layer_loss_costs}


def held_out_indices(dataset: ImageDataset, classes, exclude, per_class: int, seed: int = 0) -> torch.Tensor:
    """A seeded draw of up to ``per_class`` images of each of ``classes`` from ``dataset``, none of them in
    ``exclude`` (the contribution samples). Indices into ``dataset``, sorted."""
    if per_class < 1:
        raise ReassemblyError(f"held-out images per class must be at least 1, not {per_class}")
    excluded = np.zeros(len(dataset), dtype=bool)
    excluded[np.asarray(list(exclude), dtype=np.int64)] = True
    labels = dataset.labels.numpy()
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        pool = np.flatnonzero((labels == c) & ~excluded)
        if len(pool) == 0:
            raise ReassemblyError(f"class {c} of {dataset.name} has no training image left for calibration after "
                                  "the contribution samples; load more training images")
        chosen.append(rng.permutation(pool)[:per_class])
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


def mask_cost(model: nn.Module, masks: ComponentMasks, input_size=None) -> tuple[int, int]:
    """Parameters (conv/linear weights and biases, the affine of a batch norm right after a layer) and conv/linear
    MACs of the component ``masks`` describes, counted without extracting it."""
    input_size = tuple(input_size or masks.input_size)
    spatial, order = {}, []
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, args, out):
            spatial[name] = out[0, 0].numel()
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in masks.layers]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    order = list(modules)
    params = macs = 0
    for name, layer in masks.layers.items():
        m = modules[name]
        taps = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
        q, p = len(layer.keep_out), len(layer.keep_in)
        # a grouped conv keeps whole groups, so each output still reads in_channels // groups inputs
        weights = q * (layer.in_channels // layer.groups if layer.groups > 1 else p) * taps
        extra = q if m.bias is not None else 0
        after = order.index(name) + 1
        if after < len(order) and isinstance(modules[order[after]], (nn.BatchNorm1d, nn.BatchNorm2d)):
            extra += 2 * q
        params += weights + extra
        macs += weights * spatial[name]
    return params, macs


def masked_logits(model: nn.Module, masks: ComponentMasks, inputs: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The component's logits computed on the full model: every input channel a conv/linear layer drops is zeroed
    (forward pre-hooks), and only the logits of the record's classes are returned, in its order."""
    modules = dict(model.named_modules())
    handles = []
    for name, layer in masks.layers.items():
        if len(layer.keep_in) == layer.in_channels:
            continue
        keep = torch.zeros(layer.in_channels, dtype=torch.bool)
        keep[layer.keep_in] = True
        shape = (1, -1, 1, 1) if isinstance(modules[name], nn.Conv2d) else (1, -1)

        def zero(module, args, keep=keep, shape=shape):
            return (args[0] * keep.view(shape).to(args[0]),)
        handles.append(modules[name].register_forward_pre_hook(zero))
    was = model.training
    try:
        out = logits_in_batches(model, inputs, batch_size)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out[:, masks.classes]


def _accuracy(logits: torch.Tensor, local: torch.Tensor) -> float:
    return round(100.0 * (logits.argmax(1) == local).double().mean().item(), 2)


def _loss(logits: torch.Tensor, local: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), local).item()


def calibrate_thresholds(model: nn.Module, contributions: Contributions, classes, held_out: ImageDataset, *,
                         grid: dict | None = None, tolerance: float = 0.0, mean=None, std=None,
                         input_size=(3, 32, 32), model_name: str = "model", batch_size: int = 500,
                         restore: bool = True, match_loss: bool = False) -> Calibration:
    """The cheapest grid point whose component is at least as accurate as the original on ``held_out`` (see the
    module docstring). ``held_out`` holds training images with the model's own labels (full label space) that were
    not contribution samples, e.g. ``dataset.subset(held_out_indices(...))``; only images of ``classes`` count.
    ``grid`` maps "conv"/"linear" to lists of (alpha, beta) pairs (default :data:`GRID`). ``restore``: when no grid
    point is accurate enough, restore the layers whose pruning costs accuracy (module docstring); costs one pass over
    the held-out images per layer the best grid point prunes, plus one per layer restored. ``match_loss``: the
    component's held-out cross-entropy must not exceed the original's either (module docstring)."""
    grid = {**GRID, **(grid or {})}
    for kind, pairs in grid.items():
        if kind not in ("conv", "linear") or not pairs:
            raise ReassemblyError(f"the calibration grid needs (alpha, beta) pairs for 'conv' and 'linear', got "
                                  f"{kind!r}: {pairs!r}")
    if tolerance < 0:
        raise ReassemblyError(f"tolerance must be at least 0 points, not {tolerance}")
    classes = [int(c) for c in classes]
    rows = torch.nonzero(torch.isin(held_out.labels, torch.tensor(classes)))[:, 0]
    if len(rows) == 0:
        raise ReassemblyError(f"the held-out images hold no image of classes {classes}")
    mean, std = resolve_normalization(model, mean, std)
    device = next(model.parameters()).device
    inputs = Preprocess(mean, std)(held_out.images[rows]).to(device)
    local = torch.tensor([classes.index(int(c)) for c in held_out.labels[rows]])
    full = logits_in_batches(model, inputs, batch_size)[:, classes]
    original, original_loss = _accuracy(full, local), _loss(full, local)
    target = original - tolerance

    def evaluate(row):
        logits = masked_logits(model, row["_masks"], inputs, batch_size)
        row["accuracy"], loss = _accuracy(logits, local), _loss(logits, local)
        row["loss"] = round(loss, 6)
        return row["accuracy"] >= target and (not match_loss or loss <= original_loss)

    def candidate(masks):
        params, macs = mask_cost(model, masks, input_size)
        key = tuple((n, tuple(l.keep_in), tuple(l.keep_out)) for n, l in masks.layers.items())
        return {"alpha": masks.alpha, "beta": masks.beta, "params": params, "macs": macs, "accuracy": None,
                "loss": None, "same_as": seen.get(key), "_masks": masks, "_key": key}

    graph = channel_graph(model, tuple(input_size), model_name)
    candidates, seen = [], {}
    for (ca, cb), (la, lb) in itertools.product(grid["conv"], grid["linear"]):
        alpha, beta = {**ALPHA, "conv": ca, "linear": la}, {**BETA, "conv": cb, "linear": lb}
        candidates.append(candidate(locate_component(model, contributions, classes, input_size=input_size,
                                                     alpha=alpha, beta=beta, model_name=model_name, graph=graph)))
        seen.setdefault(candidates[-1]["_key"], len(candidates) - 1)
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i]["params"], candidates[i]["macs"], i))
    chosen, scores = None, {}
    for i in order:
        row = candidates[i]
        if row["same_as"] is not None:
            row["accuracy"], row["loss"] = candidates[row["same_as"]]["accuracy"], candidates[row["same_as"]]["loss"]
            continue
        met = evaluate(row)
        scores[i] = row["accuracy"]
        if met:
            chosen = i
            break
    met = chosen is not None
    if not met:
        chosen = min(scores, key=lambda i: (-scores[i], candidates[i]["params"], candidates[i]["macs"], i))
    costs, loss_costs = {}, {}
    if not met and restore:
        best = candidates[chosen]["_masks"]
        pruned = [name for name, layer in best.layers.items() if len(layer.keep_in) < layer.in_channels]
        for name in pruned:
            alone = masked_logits(model, dataclasses.replace(best, layers={name: best.layers[name]}), inputs,
                                  batch_size)
            costs[name] = round(original - _accuracy(alone, local), 2)
            loss_costs[name] = round(_loss(alone, local) - original_loss, 6)
        if match_loss:  # every pruned layer, by the loss it adds: restoring them all gives the original's logits
            restoring = sorted(pruned, key=lambda n: (-loss_costs[n], pruned.index(n)))
        else:
            restoring = sorted((n for n in pruned if costs[n] > 0), key=lambda n: (-costs[n], pruned.index(n)))
        previous = None
        for k in range(1, len(restoring) + 1):
            masks = locate_component(model, contributions, classes, input_size=input_size, alpha=best.alpha,
                                     beta=best.beta, model_name=model_name, graph=graph, keep_whole=restoring[:k])
            row = candidate(masks)
            candidates.append(row)
            if previous is not None and row["_key"] == candidates[previous]["_key"]:  # e.g. a depthwise pair
                row.update(same_as=previous, accuracy=candidates[previous]["accuracy"],
                           loss=candidates[previous]["loss"])
                continue
            previous = len(candidates) - 1
            row["same_as"] = None
            met = evaluate(row)
            scores[previous] = row["accuracy"]
            if met:
                chosen = previous
                break
        if not met:
            chosen = min(scores, key=lambda i: (-scores[i], candidates[i]["params"], candidates[i]["macs"], i))
    if not met:
        restored = ", nor restoring the layers whose pruning costs accuracy" if restore else ""
        warnings.warn(f"{model_name}: no threshold pair of the grid keeps the original's held-out accuracy "
                      f"({original:.2f} %, target {target:.2f} %"
                      f"{f', cross-entropy {original_loss:.4f}' if match_loss else ''}) for classes {classes}"
                      f"{restored}; using the most accurate ({scores[chosen]:.2f} %)", stacklevel=2)
    tried = [{**{k: v for k, v in row.items() if not k.startswith("_")}, "kept_whole": row["_masks"].kept_whole}
             for row in candidates]
    return Calibration(candidates[chosen]["_masks"], met, original, round(target, 2), len(rows), chosen, tried,
                       costs, round(original_loss, 6), match_loss, loss_costs)
