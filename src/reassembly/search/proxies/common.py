"""What the proxies share: target batches, the activations they watch, linearisation, and block attribution.

Activations are caught where they are computed, as calls of ``torch.nn.functional`` (and ``torch.relu``), through a
``TorchFunctionMode``, not with hooks on activation *modules*: the CIFAR ResNets call ``F.relu`` in their forward
and MobileNets' ``nn.ReLU6`` is a ``Hardtanh``, so module hooks (as in the official NASWOT code) would miss all of
the first and, with its list, all of the second. A call inside another watched call is seen once (the mode is off
while a function runs). :func:`watch_module_outputs` is the module-hook alternative, for proxies that want the outputs
of given module types (``naswot_official`` reproduces the official code's hooks on ``nn.Linear``, attention and
``nn.Dropout`` modules with it).

A proxy's *block terms* attribute what it measures to *parts* of a network (the blocks of a source model): forward
hooks on the part modules say which part is running when an activation fires, and which part a parameter
belongs to is read from ``part.parameters()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised float images N x C x H x W, integer labels N)

ACTIVATIONS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6, F.hardtanh,
    F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.gelu, F.silu, F.hardswish, F.elu, F.elu_, F.selu, F.celu, F.mish,
    F.prelu, F.rrelu,
})  # fmt: skip
NORMS = frozenset({F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm})
DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout})


class WatchActivations(TorchFunctionMode):
    """Call ``callback(output)`` with the output of every activation function the forward computes."""

    def __init__(self, callback: Callable[[torch.Tensor], None]):
        super().__init__()
        self.callback = callback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ACTIVATIONS and isinstance(out, torch.Tensor):
            self.callback(out)
        return out


@contextlib.contextmanager
def watch_module_outputs(net: nn.Module, selected: Callable[[nn.Module], bool],
                         callback: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback(output)`` with the output of every module of ``net`` for which ``selected(module)`` holds,
    each time it runs (a tuple or list output gives its first element). Enter it before a :class:`PartTracker` so
    that, on a part that is itself selected, its output is seen while the part is still the current one (forward
    hooks run in the order they were registered)."""

    def hook(_module, _args, output):
        while isinstance(output, (tuple, list)) and output:
            output = output[0]
        if isinstance(output, torch.Tensor):
            callback(output)

    handles = [module.register_forward_hook(hook) for module in net.modules() if selected(module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class WithoutNorms(TorchFunctionMode):
    """Normalisation and dropout calls return their input unchanged (synflow's linearised network)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in NORMS or func in DROPOUTS:
            return args[0] if args else kwargs["input"]
        return func(*args, **(kwargs or {}))


class PartTracker:
    """While installed (``with tracker.installed():``), ``tracker.current`` is the index of the part whose forward
    is running (``None`` outside every part); with ``keep=True``, ``tracker.inputs[i]`` and ``tracker.outputs[i]``
    are the (detached) tensors part ``i`` last received and returned."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = list(parts)
        self.current: int | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def installed(self, keep: bool = False) -> Iterator[PartTracker]:
        handles = []
        for index, part in enumerate(self.parts):
            def enter(_module, args, index=index):
                self.current = index
                if keep and args and isinstance(args[0], torch.Tensor):
                    self.inputs[index] = args[0].detach()

            def leave(_module, _args, output, index=index):
                self.current = None
                if keep and isinstance(output, torch.Tensor):
                    self.outputs[index] = output.detach()

            handles.append(part.register_forward_pre_hook(enter))
            handles.append(part.register_forward_hook(leave))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.current = None


def parameter_owner(parts: list[nn.Module]) -> dict[int, int]:
    """``id(parameter) -> index of the part holding it`` (the first part, if several share it)."""
    owner: dict[int, int] = {}
    for index, part in enumerate(parts):
        for parameter in part.parameters():
            owner.setdefault(id(parameter), index)
    return owner


def target_batches(images: torch.Tensor, labels: torch.Tensor, batches: int = 5, batch_size: int = 32,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` disjoint batches of ``batch_size`` images drawn at random (seeded) from a dataset held as uint8
    ``images`` and ``labels`` (the official code read the first images in order, which in a class-sorted dataset
    are nearly all of one class). Fewer images than ``batches * batch_size`` give fewer batches; fewer than one
    batch, one smaller batch."""
    if batches < 1 or batch_size < 2:
        raise ValueError("proxies need at least one batch of at least two images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    count = max(1, min(batches, len(images) // batch_size))
    return [(images[chosen], labels[chosen]) for chosen in
            (order[i * batch_size : (i + 1) * batch_size] for i in range(count)) if len(chosen) >= 2]


def averaged_over_batches(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None,
                          score_batch: Callable[[torch.Tensor, PartTracker], tuple[float, list[float]]]
                          ) -> tuple[float, list[float] | None]:
    """A proxy's score of ``net`` (in train mode) and of each of ``parts``, each the mean over ``batches`` of what
    ``score_batch(images, tracker)`` returns for one batch: (the network's score, one score per part)."""
    parts = list(parts or [])
    net.train()
    tracker = PartTracker(parts)
    totals, terms = [], [[] for _ in parts]
    for images, _labels in batches:
        total, part_scores = score_batch(images, tracker)
        totals.append(total)
        for index, score in enumerate(part_scores):
            terms[index].append(score)
    mean = sum(totals) / len(totals)
    return mean, [sum(t) / len(t) for t in terms] if parts else None
