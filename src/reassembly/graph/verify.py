"""Check that a chain is faithful: its blocks, run in order, reproduce the model and the recorded shapes."""

from __future__ import annotations

import torch
import torch.nn as nn

from .chain import NodeChain
from .errors import RecompositionError


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference|| (absolute error when the reference is zero)."""
    difference = torch.linalg.vector_norm((result - reference).double()).item()
    scale = torch.linalg.vector_norm(reference.double()).item()
    return difference / scale if scale > 0 else difference


def verify(chain: NodeChain, model: nn.Module, x: torch.Tensor, *, tolerance: float = 1e-5) -> float:
    """Run every node of ``chain`` in turn on ``x`` and compare with ``model(x)``, both in eval mode.

    Outputs that are tuples, lists or dicts are compared element by element (tensors to ``tolerance``, other values
    exactly); the largest relative error counts. Raises :class:`RecompositionError` naming the first node whose input
    or output shape differs from the record, or giving the relative error when it exceeds ``tolerance``; returns the
    relative error otherwise."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            reference = model(x)
            value = x
            for node in chain:
                _check_shape(chain, node.name, "input", node.in_shape, value)
                value = chain.block(node.index, node.index + 1)(value)
                _check_shape(chain, node.name, "output", node.out_shape, value)
    finally:
        for module, training in modes.items():
            module.training = training
    error = _difference(chain, value, reference, "output")
    if not error < tolerance:
        raise RecompositionError(
            f"{chain.name}: running the {len(chain)} blocks in order differs from the model by relative error "
            f"{error:.3g} (tolerance {tolerance:g}); the forward probably depends on more than the tensors crossing "
            "the cuts"
        )
    return error


def _difference(chain: NodeChain, value, reference, where: str) -> float:
    """The largest relative error between the tensors of ``value`` and ``reference``, which must share their structure
    (tuples, lists, dicts) and their other values; ``where`` locates the element in errors (``output[1]['logits']``)."""
    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise RecompositionError(f"{chain.name}: the chain returns {kind} at {where}, the model a tensor")
        if value.shape != reference.shape:
            raise RecompositionError(
                f"{chain.name}: the chain returns shape {tuple(value.shape)} at {where}, "
                f"the model {tuple(reference.shape)}"
            )
        return relative_error(value, reference)
    if isinstance(reference, (tuple, list)) and type(value) is type(reference) and len(value) == len(reference):
        pairs = [(f"{where}[{index}]", v, r) for index, (v, r) in enumerate(zip(value, reference))]
    elif isinstance(reference, dict) and isinstance(value, dict) and list(value) == list(reference):
        pairs = [(f"{where}[{key!r}]", value[key], reference[key]) for key in reference]
    elif type(value) is type(reference) and value == reference:
        return 0.0
    else:
        raise RecompositionError(
            f"{chain.name}: the chain returns {value!r:.80} at {where}, the model {reference!r:.80}"
        )
    return max((_difference(chain, v, r, path) for path, v, r in pairs), default=0.0)


def _check_shape(chain: NodeChain, name: str, side: str, recorded, value) -> None:
    if recorded is None:
        return
    actual = tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else None
    if actual != tuple(recorded):
        raise RecompositionError(
            f"{chain.name}: node `{name}` {side} has shape {actual}, but the chain records {tuple(recorded)} "
            f"(dissected at input size {tuple(chain.input_size)})"
        )
