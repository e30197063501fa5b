"""Relative contribution (MDA step 2): how much each input channel of every conv and linear layer feeds each of its
output channels, summed per class over the selected samples.

Reads a classifier and the images chosen by :func:`reassembly.lego.samples.select_samples`; writes
:class:`Contributions`: for every ``nn.Conv2d`` / ``nn.Linear`` (by module path) a float64 array ``(num_classes, Q,
P_group)`` with ``A[c, q, p] = sum over samples b of class c of max(0, C_b[q, p])``, where ``C_b[q, p]`` is the part
of output channel ``q``'s pre-activation (bias excluded), summed over all output positions, that comes from input
channel ``p``. ``P_group`` is the layer's input channels per group (``in_channels // groups``; 1 for a depthwise
conv), so grouped and depthwise convolutions are exact, not an error. Saved as safetensors (one tensor per layer)
with a JSON header; never pickle.

Everything is accumulated in ONE forward pass over the samples, through forward hooks on the layers, and no loop runs
over channels:

* conv: the positive part is taken after the spatial sum, so ``C_b[q, p] = sum_k W[q, p, k] * S_b[p, k]`` with
  ``S_b[p, k]`` the input summed over the positions that kernel tap ``k`` visits (``kh * kw`` strided window sums of
  the padded input; no unfold of the whole map). One einsum per batch gives ``C_b`` for every (q, p).
* linear: ``max(0, w * x) = max(0, w) * max(0, x) + min(0, w) * min(0, x)`` exactly, so the per-class sums of the
  positive and negative parts of the input are all that is accumulated; ``A`` is formed once at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset, Preprocess
from ..errors import ReassemblyError
from ..io import atomic_path
from ..train.evaluate import resolve_normalization
from .samples import SampleSelection

FORMAT = "reassembly.lego.contributions/1"


@dataclass
class LayerContribution:
    """Per-class contributions of one layer: ``total`` is (num_classes, Q, P_group) float64."""

    kind: str  # "conv" | "linear"
    groups: int
    in_channels: int
    out_channels: int
    total: torch.Tensor

    def normalised(self, classes=None, eps: float = 1e-5) -> torch.Tensor:
        """Min-max normalisation of each (class, output) row over the inputs of its group, as MDA thresholds it."""
        a = self.total if classes is None else self.total[list(classes)]
        low, high = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
        return (a - low) / (high - low + eps)


@dataclass
class Contributions:
    """Relative contributions of every conv/linear layer, in the model's call order; ``samples[c]`` is how many
    samples of class ``c`` went in."""

    layers: dict[str, LayerContribution]
    samples: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.samples)

    def save(self, path) -> None:
        header = {"format": FORMAT, "samples": self.samples.tolist(), "meta": self.meta,
                  "layers": {name: {"kind": l.kind, "groups": l.groups, "in_channels": l.in_channels,
                                    "out_channels": l.out_channels} for name, l in self.layers.items()}}
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({name: l.total.contiguous() for name, l in self.layers.items()}, str(tmp),
                      metadata={"reassembly": json.dumps(header)})

    @classmethod
    def load(cls, path) -> Contributions:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            header = json.loads((handle.metadata() or {}).get("reassembly", "{}"))
            if header.get("format") != FORMAT:
                raise ReassemblyError(f"{path} is not a contributions file written by reassembly.lego")
            layers = {name: LayerContribution(info["kind"], info["groups"], info["in_channels"],
                                              info["out_channels"], handle.get_tensor(name))
                      for name, info in header["layers"].items()}
        return cls(layers, torch.tensor(header["samples"], dtype=torch.long), header.get("meta", {}))


def conv_window_sums(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``S[b, p, k]``: input channel ``p`` summed over every position that kernel tap ``k`` meets, (B, P, kh*kw)."""
    if conv.padding_mode == "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice)
    else:
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw].sum((2, 3))
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=2)


def conv_contribution(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Per-sample contributions ``C_b[q, p]`` of a conv, before the positive part: (B, Q, P_group)."""
    g = conv.groups
    q, pg = conv.out_channels, conv.in_channels // g
    s = conv_window_sums(x, conv).reshape(x.shape[0], g, pg, -1)
    w = conv.weight.reshape(g, q // g, pg, -1).to(s.dtype)
    return torch.einsum("bgpk,gqpk->bgqp", s, w).reshape(x.shape[0], q, pg)


def linear_contribution(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Per-sample contributions ``C_b[q, p] = W[q, p] x_b[p]`` of a linear layer: (B, Q, P). Direct form, for checks."""
    return linear.weight[None] * x[:, None, :]


class _Accumulator:
    """Forward hooks that add every layer's per-class positive contributions of the running batch."""

    def __init__(self, model: nn.Module, num_classes: int, layers=None):
        self.num_classes = num_classes
        self.labels: torch.Tensor | None = None
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        if layers is not None:
            missing = [n for n in layers if n not in self.modules]
            if missing:
                raise ReassemblyError(f"no Conv2d or Linear layer named {missing[0]!r} in the model; choose from "
                                      f"{', '.join(list(self.modules)[:8])}...")
            self.modules = {n: self.modules[n] for n in layers}
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.calls = dict.fromkeys(self.modules, 0)
        self.order: list[str] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.calls[name] += 1
            if name not in self.order:
                self.order.append(name)
            x = inputs[0].detach()
            onehot = F.one_hot(self.labels, self.num_classes).to(torch.float64)  # (B, N)
            if isinstance(module, nn.Conv2d):
                if x.ndim != 4:
                    raise ReassemblyError(f"layer {name}: MDA needs a batched (B, C, H, W) input, got {x.ndim} dims")
                c = conv_contribution(x.float(), module).clamp_(min=0)
                part = [(onehot.T @ c.reshape(len(c), -1).double()).reshape(self.num_classes, *c.shape[1:])]
            else:
                if x.ndim != 2:
                    raise ReassemblyError(f"layer {name}: a linear layer on {x.ndim}-d inputs (tokens?) is not "
                                          "supported by MDA yet; only (batch, features)")
                x = x.double()
                part = [onehot.T @ x.clamp(min=0), onehot.T @ x.clamp(max=0)]
            if name in self.sums:
                for total, new in zip(self.sums[name], part):
                    total += new
            else:
                self.sums[name] = part
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self, samples: torch.Tensor, batches: int) -> Contributions:
        shared = [n for n, k in self.calls.items() if k not in (0, batches)]
        if shared:
            raise ReassemblyError(f"layer {shared[0]} runs {self.calls[shared[0]] // max(batches, 1)} times per "
                                  "forward pass; MDA cannot attribute channels of a shared (reused) layer")
        layers = {}
        for name in self.order:
            m = self.modules[name]
            if isinstance(m, nn.Conv2d):
                total = self.sums[name][0].cpu()
                layers[name] = LayerContribution("conv", m.groups, m.in_channels, m.out_channels, total)
            else:
                w = m.weight.detach().double().cpu()
                pos, neg = self.sums[name]
                total = w.clamp(min=0)[None] * pos.cpu()[:, None, :] + w.clamp(max=0)[None] * neg.cpu()[:, None, :]
                layers[name] = LayerContribution("linear", 1, m.in_features, m.out_features, total)
        return Contributions(layers, samples)


@torch.no_grad()
def accumulate_contributions(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                             batch_size: int = 128, layers=None) -> Contributions:
    """Contributions of ``model`` on already preprocessed ``inputs`` with class ``labels``, in one pass of batches.

    ``layers`` restricts the work to some module paths (default: every Conv2d and Linear). Eval mode is set here."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        raise ReassemblyError("no samples to compute contributions from")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ReassemblyError(f"sample labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    model.eval()
    hooks = _Accumulator(model, num_classes, layers)
    device = next(model.parameters()).device
    batches = 0
    try:
        for start in range(0, len(labels), batch_size):
            hooks.labels = labels[start:start + batch_size].to(device)
            model(inputs[start:start + batch_size].to(device))
            batches += 1
    finally:
        hooks.close()
    return hooks.result(torch.bincount(labels, minlength=num_classes), batches)


def compute_contributions(model: nn.Module, dataset: ImageDataset, selection: SampleSelection, *, mean=None,
                          std=None, batch_size: int = 128, device: str | torch.device = "cpu",
                          layers=None) -> Contributions:
    """Contributions of ``model`` over the images of ``dataset`` chosen by ``selection`` (MDA step 2)."""
    if selection.num_classes != dataset.num_classes:
        raise ReassemblyError(f"the sample selection covers {selection.num_classes} classes but {dataset.name} has "
                              f"{dataset.num_classes}; select samples on the same dataset")
    mean, std = resolve_normalization(model, mean, std)
    index, labels = selection.flat()
    model.to(device)
    inputs = Preprocess(mean, std)(dataset.images[index])
    result = accumulate_contributions(model, inputs, labels, dataset.num_classes, batch_size=batch_size,
                                      layers=layers)
    result.meta = {"dataset": dataset.name, "per_class": [len(c) for c in selection.indices]}
    return result
