"""``dissect``: any torch model to a :class:`NodeChain` (trace or record, probe once, find cuts, plan, describe)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from .calls import record_calls
from .chain import NodeChain
from .cuts import analyse
from .errors import DissectionError, RecompositionError, UntraceableModelError, first_line
from .nodes import describe_nodes
from .plan import GRANULARITIES, plan
from .probe import probe
from .sizes import size_recipes
from .trace import TracedModel, trace
from .verify import relative_error

PROBE_BATCH = 2  # more than one sample, so the batch axis can be told apart from the others


def _example(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), torch.empty(0))
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(PROBE_BATCH, *input_size, generator=generator, dtype=dtype).to(reference.device)


def _graph_of(
    model: nn.Module, example: torch.Tensor, cuts: list[str] | None, model_name: str, strict: bool
) -> TracedModel:
    """The traced graph; with cut names, fall back to recorded module calls when tracing fails or when a cut lies
    inside a module that had to be kept whole."""
    if cuts is None:
        return trace(model, model_name, strict)
    for name in cuts:
        try:
            model.get_submodule(name)
        except AttributeError:
            message = f"cut `{name}`: {model_name} has no such submodule (see model.named_modules())"
            raise DissectionError(message) from None
    try:
        traced = trace(model, model_name, strict)
    except UntraceableModelError:
        return record_calls(model, example, cuts, model_name)
    if any(name.startswith(f"{path}.") for name in cuts for path in traced.opaque):
        return record_calls(model, example, cuts, model_name)
    return traced


def dissect(
    model: nn.Module,
    input_size: Sequence[int] = (3, 32, 32),
    granularity: str = "block",
    cuts: Sequence[str] | None = None,
    *,
    name: str | None = None,
    strict: bool = False,
) -> NodeChain:
    """Cut ``model`` into a chain of atomic nodes at legal cut points.

    ``input_size`` is one sample's shape (C, H, W); ``name`` (default: the registry name the model was built under,
    else its class name) labels errors and ``to_dict()``. ``granularity`` is ``"block"`` (one node per residual or
    transformer block, or per weighted layer in plain chains), ``"stage"`` or ``"fine"`` (every legal cut).
    ``cuts`` lists module names to cut after instead; it also works for models torch.fx cannot trace, by replaying
    the recorded module calls. A submodule whose forward torch.fx cannot trace is kept whole (listed in
    ``chain.opaque``) unless ``strict``. The model is probed once in eval mode on a random batch of two; its
    training flags are restored afterwards. Raises :class:`UntraceableModelError` (naming the module) when the
    top-level forward cannot be traced (or, under ``strict``, any module) and no ``cuts`` are given, and
    :class:`DissectionError` for unusable cut names or inputs."""
    if granularity not in GRANULARITIES:
        raise DissectionError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    model_name = name or getattr(model, "reassembly_name", None) or type(model).__name__
    size = tuple(int(side) for side in input_size)
    cut_names = None if cuts is None else [str(cut) for cut in cuts]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        example = _example(model, size)
        traced = _graph_of(model, example, cut_names, model_name, strict)
        if traced.frozen:
            _warn_frozen(model_name, traced.frozen)
        try:
            facts = probe(traced.root, traced.graph, example)
        except Exception as error:
            raise DissectionError(f"{model_name} fails on an input of size {size}: {first_line(error)}") from error
        if traced.method == "module-calls":
            _check_replay(model, example, facts.output, model_name)
        flow = analyse(traced.graph, facts.shapes)
        segments = plan(model, flow, facts, size, granularity, cut_names)
        sizes = size_recipes(traced.root, flow, facts, segments, example, model_name)
        nodes = describe_nodes(traced.root, flow, facts, segments, size)
    finally:
        for module, training in modes.items():
            module.training = training
    return NodeChain(
        model,
        traced.root,
        flow,
        segments,
        nodes,
        name=model_name,
        input_size=size,
        granularity="cuts" if cut_names is not None else granularity,
        method=traced.method,
        opaque=traced.opaque,
        sizes=sizes,
    )


def _warn_frozen(model_name: str, paths: tuple[str, ...]) -> None:
    names = [f"`{path}`" if path else "the top-level forward" for path in paths]
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    warnings.warn(
        f"{model_name}: {listed} behave differently in training mode in a way the traced graph cannot follow (e.g. "
        "a drop path that skips itself in eval mode); the blocks run that code as in eval mode whatever their "
        "training flag, which is fine for evaluation and for training without it",
        stacklevel=3,
    )


def _check_replay(model: nn.Module, example: torch.Tensor, replayed, model_name: str) -> None:
    with torch.no_grad():
        reference = model(example)
    if not (isinstance(reference, torch.Tensor) and isinstance(replayed, torch.Tensor)):
        raise DissectionError(f"{model_name}: a chain of module calls needs a model that returns one tensor")
    if replayed.shape != reference.shape or relative_error(replayed, reference) > 1e-5:
        raise RecompositionError(
            f"{model_name}: calling the modules in recorded order does not reproduce the model's output (its forward "
            "computes more between or around those calls); cut at modules whose calls follow one another directly"
        )

