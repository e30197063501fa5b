"""Legal cut points of a dataflow graph: positions where a single tensor carries all the state forward.

Nodes that do not depend on the input (parameters, buffers, constants and what is computed from them alone) can be
recomputed on either side of a cut, so only input-dependent ("state") nodes are ordered and checked. A cut after
position p is legal iff exactly one state node computed at or before p is still read after p, and it is a tensor.

Sizes read from tensor shapes (``b = x.shape[0]`` early and ``x.reshape(b, -1)`` late; ``H, W`` handed to every
block) and what is computed from them alone do not count either: a block recomputes them (see :mod:`.sizes`), so
they neither cross a cut nor keep the tensor they were read from alive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.fx as fx


@dataclass
class Dataflow:
    """The state nodes of a graph in execution order and the legal cuts between them.

    ``order[0]`` is the input placeholder. ``cuts`` are the legal cut positions, ascending (p: cut after
    ``order[p]``), and ``carriers`` maps each to the tensor that crosses it. When the same tensor crosses several
    positions (dead or side-effect-only nodes follow it, e.g. shape assertions) only the first is kept: the cut sits
    right after the tensor is made, and an in-place update that follows runs in the next block (on a copy).
    ``last_use[i]`` is the position of the last reader of
    ``order[i]`` (``len(order)`` for the graph output), sizes not counted; ``sizes`` are the state nodes that hold
    sizes read from tensor shapes."""

    order: list[fx.Node]
    position: dict[fx.Node, int]
    constants: frozenset[fx.Node]
    sizes: frozenset[fx.Node]
    output: fx.Node
    last_use: np.ndarray
    cuts: list[int]
    carriers: dict[int, fx.Node]
    _canonical: dict[int, int]

    def value_after(self, position: int):
        """What crosses the boundary after ``position``: the input (0), a cut's tensor, or the graph's output."""
        if position == 0:
            return self.order[0]
        if position == len(self.order) - 1:
            return self.output.args[0]
        return self.carriers[position]

    def canonical_cut(self, position: int) -> int | None:
        """The kept legal cut equivalent to a cut after ``position`` (same crossing tensor), or None if illegal."""
        return self._canonical.get(position)

    def cut_of(self, node: fx.Node) -> int | None:
        """The legal cut that ``node`` crosses alone, if any."""
        position = self.position.get(node)
        return None if position is None else self._canonical.get(position)


def analyse(graph: fx.Graph, shapes: dict[fx.Node, tuple[int, ...] | None]) -> Dataflow:
    """Order the state nodes of ``graph`` and find every legal cut (``shapes`` says which values are tensors)."""
    order: list[fx.Node] = []
    state: set[fx.Node] = set()
    constants: set[fx.Node] = set()
    sizes: set[fx.Node] = set()
    output = None
    for node in graph.nodes:
        if node.op == "output":
            output = node
        elif node.op == "placeholder" or any(arg in state for arg in node.all_input_nodes):
            state.add(node)
            order.append(node)
            inputs = [arg for arg in node.all_input_nodes if arg in state]
            if shapes.get(node) is None and (reads_shape(node) or all(arg in sizes for arg in inputs)):
                sizes.add(node)
        else:
            constants.add(node)
    position = {node: index for index, node in enumerate(order)}
    count = len(order)
    last_use = np.arange(count)
    for index, node in enumerate(order):
        readers = [count if user is output else position[user] for user in node.users if user not in sizes]
        if readers and node not in sizes:
            last_use[index] = max(index, max(readers))

    # Node i is live across the cut after p for i <= p < last_use[i]; sweep +1/-1 events (and +i/-i to find the
    # single live node where exactly one is live).
    starts = np.arange(count)
    live = np.zeros(count + 1, dtype=np.int64)
    index_sum = np.zeros(count + 1, dtype=np.int64)
    np.add.at(live, starts, 1)
    np.add.at(live, last_use, -1)
    np.add.at(index_sum, starts, starts)
    np.add.at(index_sum, last_use, -starts)
    live, index_sum = np.cumsum(live)[:count], np.cumsum(index_sum)[:count]

    cut_by_carrier: dict[fx.Node, int] = {}
    carrier_of: dict[int, fx.Node] = {}
    for p in np.flatnonzero(live[: count - 1] == 1).tolist():
        carrier = order[index_sum[p]]
        if p == 0 or carrier is order[0] or shapes.get(carrier) is None:
            continue
        carrier_of[p] = carrier
        cut_by_carrier.setdefault(carrier, p)  # right after the tensor is made
    carriers = {p: carrier for carrier, p in cut_by_carrier.items()}
    canonical = {p: cut_by_carrier[carrier] for p, carrier in carrier_of.items()}
    return Dataflow(
        order, position, frozenset(constants), frozenset(sizes), output, last_use, sorted(carriers), carriers, canonical
    )


def reads_shape(node: fx.Node) -> bool:
    """Whether ``node`` reads the shape of a tensor (``x.shape``, ``x.size(1)``, ``x.dim()``) rather than its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")
