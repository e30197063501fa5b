"""Sizes a block recomputes instead of receiving them across a cut.

A forward often reads a size from a tensor shape long before it uses it: ``b = x.shape[0]`` at the start and
``x.reshape(b, -1)`` before the classifier, or ``H, W`` taken from the patch embedding and passed to every block. Only
one tensor crosses a cut, so a block that needs such a size recomputes it. The model is probed once more on a single
sample to tell which: a size that follows the batch (2 on the probe batch, 1 on one sample) is the batch axis of the
block's input; one that stays put is fixed by the input size the chain was dissected at (the block then checks that
its input has the recorded shape); one computed from such sizes is computed again. Any other size (read from a
tensor whose batch axis was folded into another) cannot be recomputed: dissection stops with an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .cuts import Dataflow, reads_shape
from .errors import DissectionError
from .nodes import segment_nodes
from .plan import Segment
from .probe import Probe, probe
from .trace import SOURCE


@dataclass(frozen=True)
class SizeRecipe:
    """How a block recomputes a size: ``"batch"`` (the batch axis of its input), ``"constant"`` (``value``, fixed by
    the input size) or ``"expression"`` (the node itself, on recomputed sizes)."""

    how: str
    value: object = None


def size_recipes(
    root: nn.Module,
    flow: Dataflow,
    facts: Probe,
    segments: list[Segment],
    example: torch.Tensor,
    model_name: str,
) -> dict[fx.Node, SizeRecipe]:
    """Recipes for the sizes that a one-node block needs but does not compute from its own input (empty when none
    does: the extra probe only runs when a size crosses a boundary)."""
    wanted = _wanted(flow, segments)
    if not wanted:
        return {}
    single = probe(root, flow.output.graph, example[:1])
    batch = facts.shapes[flow.order[0]][0]
    recipes: dict[fx.Node, SizeRecipe] = {}

    def recipe(node: fx.Node, readers: set[int], crossing: fx.Node) -> SizeRecipe:
        """The recipe for ``node``, needed in segments ``readers`` to recompute the size ``crossing``."""
        if node in recipes:
            return recipes[node]
        value, alone = facts.values.get(node), single.values.get(node, ())
        derived = "" if node is crossing else f"computed from `{node.name}` = {value!r}, which is "
        if value == alone:
            recipes[node] = SizeRecipe("constant", value)
        elif (value, alone) == (batch, 1):
            entries = [flow.value_after(segments[index].start) for index in readers]
            if any(facts.shapes[entry][0] != batch or single.shapes[entry][0] != 1 for entry in entries):
                why = f"{derived}the batch size, but the block input is not batch-first"
                raise _unrecoverable(model_name, crossing, facts.values.get(crossing), why)
            recipes[node] = SizeRecipe("batch")
        elif not reads_shape(node):
            recipes[node] = SizeRecipe("expression")
            for arg in node.all_input_nodes:
                if arg in flow.sizes:
                    recipe(arg, readers, crossing)
        else:
            why = f"{derived}neither the batch size nor fixed by the input size"
            raise _unrecoverable(model_name, crossing, facts.values.get(crossing), why)
        return recipes[node]

    for node, readers in wanted.items():
        recipe(node, readers, node)
    return recipes


def _wanted(flow: Dataflow, segments: list[Segment]) -> dict[fx.Node, set[int]]:
    """The sizes each one-node block must recompute (by segment index): sizes made in another segment, and reads of
    the shape of a tensor that is neither made in the segment nor its input."""
    wanted: dict[fx.Node, set[int]] = {}
    for index, segment in enumerate(segments):
        members = set(segment_nodes(flow, segment))
        available = members | {flow.value_after(segment.start)} | flow.constants | flow.sizes
        readers = [*members, flow.output] if index == len(segments) - 1 else members
        for node in readers:
            for arg in node.all_input_nodes:
                if arg in flow.sizes and arg not in members:
                    wanted.setdefault(arg, set()).add(index)
                elif node in flow.sizes and arg not in available:
                    wanted.setdefault(node, set()).add(index)
    return wanted


def _unrecoverable(model_name: str, node: fx.Node, value, why: str) -> DissectionError:
    source = node.meta.get(SOURCE)
    return DissectionError(
        f"{model_name}: size `{node.name}` = {value!r}{f' (at {source})' if source else ''} is read from a tensor "
        f"shape and used after a node boundary; it is {why}, so the block after the boundary cannot recompute it. "
        "Compute it inside the block from the block's input, or dissect with cuts=[...] that keep its use together "
        "with the tensor it is read from"
    )


