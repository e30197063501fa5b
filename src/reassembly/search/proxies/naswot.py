"""NASWOT (Mellor et al. 2021), as DeRy scores candidates (dery-spec 4.2), with the official code's defects fixed.

Two proxies: ``naswot`` (activation codes only, the default) and ``naswot_official`` (also the outputs of the
linear, attention and dropout modules the official code hooks; see the end of this docstring).

Score of a network on a batch of B target images: every activation output (ReLU, ReLU6/Hardtanh, GELU, LeakyReLU,
SiLU, ... wherever they are computed, see :mod:`.common`) is flattened per image and binarised (value > 0) into a
code c; ``K = sum over outputs of c c^T + (1 - c)(1 - c)^T``, so ``K[a, b]`` is the number of units on which images
a and b agree; the score is ``log det K``. The network runs in training mode (batch norm on batch statistics) without
gradients; the proxy is averaged over the target batches.

**Sign and scale**: higher is better (codes that tell the images apart). Roughly B times the log of the number of
units, e.g. 300 to 450 for B = 32 and 10^4 to 10^6 units; ``-inf`` when two images share every code (K singular).

Fixed with respect to the official code: seeded random target images instead of the first ones in order (nearly a
single class); no augmentation while scoring; the head has the target's classes, not 1000; activations applied as
functions (``F.relu``) or as ``ReLU6`` are counted (module hooks on a list of classes missed them); no division by
the batch size (a constant the original NASWOT does not have; it does not change rankings).

**Block term** (the 0-1 program's objective): ``log det(K_b + I)`` where ``K_b`` sums the codes of the block's own
units only, while the block runs inside its own pretrained model on the same target batches. It measures how well
that block's units separate the target images in the context it was trained in. ``log det`` is not additive, so
the sum of block terms only approximates the assembled network's score, which is why the program's top candidates
are assembled and re-scored. The identity keeps the term finite for a block without activations.

**``naswot_official``: the official code's hook set.** The official DeRy code (``simlarity/zero_nas/naswot.py`` in
Adamdad/DeRy) binarises (> 0) the *output* of every module that is an activation of its list (ReLU, LeakyReLU,
GELU, PReLU, Hardswish, ELU, SELU, Mish), and also of every ``nn.Linear``, every ``nn.Dropout`` and every attention
module (timm's ``Attention``, mmcls' ``MultiheadAttention`` and ``ShiftWindowMSA``; a tuple output gives its first
element). :func:`naswot` records activations only, as NASWOT is defined (Mellor et al. code the on/off pattern of
the rectified units); :func:`naswot_official` adds, through forward hooks on the modules, the outputs of every
``nn.Linear``, ``nn.Dropout``, ``nn.MultiheadAttention`` and module whose class is named ``Attention``,
``MultiheadAttention`` or ``ShiftWindowMSA`` (this zoo's ViT attention is an ``Attention``). Everything else is the
same as :func:`naswot` (activations caught as functions, so ``F.relu`` and ``ReLU6``, which the official module
list misses, still count; the fixes above; block terms by the same attribution, a selected part's own output
counting in its term).

What the extra outputs are: signs of affine maps (pre-activations), not rectifier states. In a ViT block they
outnumber the activations by far: per token, ``qkv`` (3d), ``proj`` (d), the attention module's output (the same
tensor as ``proj``'s, counted again, as the official hooks count nested modules independently), both MLP linears
(hidden + d), against GELU's hidden units alone; timm's attention-map dropout adds softmax probabilities, all
positive, so codes of ones that add a constant to every entry of K (this zoo's attention computes no such map). A
convolutional network without linear layers or dropout gains only the head's logits (its number of classes in
units); an assembled network also gains the outputs of its linear token stitches. A dropout output in train mode is
its input masked (seeded) and scaled, so its codes are the input's codes with the dropped units off.

**Sign and scale of ``naswot_official``**: higher is better. Its kernel is :func:`naswot`'s plus a positive
semi-definite sum of code kernels, so its score is at least :func:`naswot`'s (strictly more as soon as one extra
output is recorded, e.g. a linear head, and naswot's K is non-singular), and each block term is at least naswot's;
the order of magnitude is the same, B times the log of the (larger) number of units. The official code also divides
by B and, as it registers new hooks on every call and never removes them, counts every unit i times on the i-th
batch (adding B log i to that batch's score); neither changes rankings and neither is reproduced. Why the two rank
networks differently: the extra units are many in ViT blocks and few in convolutional ones, so blocks and networks
with attention gain more than convolutional ones, and their agreement is on pre-activation signs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .common import (
    Batch,
    PartTracker,
    WatchActivations,
    averaged_over_batches,
    watch_module_outputs,
)

OFFICIAL_ATTENTION_NAMES = frozenset({"Attention", "MultiheadAttention", "ShiftWindowMSA"})


def official_hooked(module: nn.Module) -> bool:
    """Whether the official code hooks ``module`` besides its activation modules: ``nn.Linear``, ``nn.Dropout`` and
    attention (``nn.MultiheadAttention``, or a class named as timm's and mmcls' attention modules, as this zoo's)."""
    return (isinstance(module, (nn.Linear, nn.Dropout, nn.MultiheadAttention))
            or type(module).__name__ in OFFICIAL_ATTENTION_NAMES)


def _kernel_update(kernel: torch.Tensor, output: torch.Tensor) -> None:
    codes = (output.detach().flatten(1) > 0).to(torch.float32)
    agree = codes @ codes.T  # both on
    on = codes.sum(dim=1)
    units = codes.shape[1]
    kernel += (units - on[:, None] - on[None, :] + 2 * agree).to(torch.float64)  # both on + both off


def logdet(kernel: torch.Tensor) -> float:
    sign, value = torch.linalg.slogdet(kernel)
    return float(value) if float(sign) > 0 else float("-inf")


@torch.no_grad()
def code_kernels(net: nn.Module, images: torch.Tensor, tracker: PartTracker,
                 also: Callable[[nn.Module], bool] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The code kernel K of one forward of ``net`` on ``images`` (float64, N x N; ``K[a, a]`` is the number of units
    recorded) and each part's own ``K_b``: every activation output, and with ``also``, the output of every module
    for which ``also(module)`` holds (outputs whose first dimension is not the batch are skipped)."""
    n = images.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64)
    part_kernels = [torch.zeros(n, n, dtype=torch.float64) for _ in tracker.parts]

    def record(output: torch.Tensor) -> None:
        if output.dim() == 0 or output.shape[0] != n:
            return
        _kernel_update(kernel, output)
        if tracker.current is not None:
            _kernel_update(part_kernels[tracker.current], output)

    modules = watch_module_outputs(net, also, record) if also is not None else contextlib.nullcontext()
    with modules, tracker.installed(), WatchActivations(record):  # module hooks first: see watch_module_outputs
        net(images)
    return kernel, part_kernels


def _scores(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None,
            also: Callable[[nn.Module], bool] | None) -> tuple[float, list[float] | None]:
    def score_batch(images: torch.Tensor, tracker: PartTracker) -> tuple[float, list[float]]:
        kernel, part_kernels = code_kernels(net, images, tracker, also)
        eye = torch.eye(images.shape[0], dtype=torch.float64)
        return logdet(kernel), [logdet(part_kernel + eye) for part_kernel in part_kernels]

    return averaged_over_batches(net, batches, parts, score_batch)


@torch.no_grad()
def naswot(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None
           ) -> tuple[float, list[float] | None]:
    """NASWOT of ``net`` averaged over ``batches``, and the block term of each of ``parts`` (modules of ``net``)."""
    return _scores(net, batches, parts, None)


@torch.no_grad()
def naswot_official(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None
                    ) -> tuple[float, list[float] | None]:
    """:func:`naswot` with the official code's hook set: also the outputs of ``nn.Linear``, ``nn.Dropout`` and
    attention modules (:func:`official_hooked`)."""
    return _scores(net, batches, parts, official_hooked)
