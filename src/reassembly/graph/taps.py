"""Feature taps: one forward pass of a whole model yields the tensor at every boundary of its node chain.

A chain of ``L`` nodes has ``L + 1`` *points*: point ``p`` is the tensor that crosses the boundary before node ``p``
(point 0 is the model input, point ``L`` the model output). Node ``i`` reads point ``i`` and writes point ``i + 1``,
so the input and output side of every node are both points, and a block ``chain[i:j]`` maps point ``i`` to point
``j``. Running the nodes one after another is one forward pass of the model (the same operations, nothing run
twice), and it hands over every point on the way. Similarity, stitch initialisation and Model LEGO read features
through this one mechanism.

Pooling reduces a point to one vector per image as it is produced: global average pooling for feature maps
(NCHW or NHWC), the mean over all tokens (as DeRy does, prefix tokens included) or the class token for token
sequences, and flattening for anything else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .chain import NodeChain
from .errors import DissectionError

TOKEN_POOLS = ("mean", "cls")


def point_format(chain: NodeChain, point: int) -> str:
    """Layout of point ``point``: ``nchw``, ``nhwc``, ``tokens``, ``vector`` or ``other``."""
    if not 0 <= point <= len(chain):
        raise IndexError(f"{chain.name} has points 0..{len(chain)}, not {point}")
    return chain[0].in_format if point == 0 else chain[point - 1].format


def pool_point(value: torch.Tensor, layout: str, token_pool: str = "mean") -> torch.Tensor:
    """One vector per image from a point's tensor laid out as ``layout`` (see :func:`point_format`)."""
    if layout == "nchw":
        return value.mean(dim=(2, 3))
    if layout == "nhwc":
        return value.mean(dim=(1, 2))
    if layout == "tokens":
        return value.mean(dim=1) if token_pool == "mean" else value[:, 0]
    return value.flatten(1)


def _check_token_pool(chain: NodeChain, points: list[int], token_pool: str) -> None:
    if token_pool not in TOKEN_POOLS:
        raise DissectionError(f"token pooling must be one of {', '.join(TOKEN_POOLS)}, not {token_pool!r}")
    if token_pool != "cls":
        return
    for point in points:
        prefix = chain[0].in_prefix_tokens if point == 0 else chain[point - 1].prefix_tokens
        if point_format(chain, point) == "tokens" and prefix < 1:
            raise DissectionError(
                f"{chain.name}: point {point} is a token sequence without a class token; pool it with 'mean'"
            )


def tap(
    chain: NodeChain,
    x: torch.Tensor,
    points: Iterable[int] | None = None,
    *,
    pool: bool = True,
    token_pool: str = "mean",
) -> dict[int, torch.Tensor]:
    """Run ``chain``'s nodes in turn on ``x`` and return the tensors at ``points`` (default: all ``L + 1``).

    With ``pool`` each tensor is reduced to (batch, features) by :func:`pool_point`; ``token_pool`` is ``"mean"``
    (all tokens) or ``"cls"`` (the first token). Nodes after the last requested point are not run. The caller
    chooses the mode (``model.eval()``) and the gradient context (``torch.no_grad()``)."""
    wanted = sorted(set(range(len(chain) + 1) if points is None else (int(p) for p in points)))
    if not wanted:
        return {}
    if wanted[0] < 0 or wanted[-1] > len(chain):
        raise IndexError(f"{chain.name} has points 0..{len(chain)}; asked for {wanted}")
    if pool:
        _check_token_pool(chain, wanted, token_pool)
    keep = set(wanted)
    found: dict[int, torch.Tensor] = {}
    value = x
    for point in range(wanted[-1] + 1):
        if point:
            value = chain.block(point - 1, point)(value)
        if point in keep:
            found[point] = pool_point(value, point_format(chain, point), token_pool) if pool else value
    return found
