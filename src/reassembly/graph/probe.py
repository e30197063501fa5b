"""One pass of the traced graph on an example input, recording every node's output shape and FLOPs.

Shapes decide where a cut may go (only a single tensor can cross it) and what a node looks like; FLOPs say which
nodes hold the network's compute. Counting per graph node in the same pass keeps dissection to a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from ..measure.counting import mac_counter


@dataclass(frozen=True)
class Probe:
    """Per-node facts from one run: ``shapes[node]`` is the full output shape (batch first) or None when the output
    is not a single tensor; ``flops[node]`` counts conv/linear/matmul/attention FLOPs (2 per multiply-accumulate) with
    the package's one counter (:func:`~reassembly.measure.counting.mac_counter`), so that a chain adds up to
    ``count_macs`` of its model. ``values[node]`` is the output of a node that yields plain Python data (a size read
    from a tensor shape and what is computed from it), so that a block can recompute it."""

    shapes: dict[fx.Node, tuple[int, ...] | None]
    flops: dict[fx.Node, int]
    values: dict[fx.Node, object]
    output: object


class _Recorder(fx.Interpreter):
    def __init__(self, root: torch.nn.Module, graph: fx.Graph, counter: FlopCounterMode):
        super().__init__(root, graph=graph)
        self.counter = counter
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.flops: dict[fx.Node, int] = {}
        self.values: dict[fx.Node, object] = {}

    def run_node(self, node: fx.Node):
        global_counts = self.counter.flop_counts["Global"]
        before = sum(global_counts.values())
        value = super().run_node(node)
        self.flops[node] = sum(global_counts.values()) - before
        self.shapes[node] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if _is_plain(value):
            self.values[node] = value
        return value


def _is_plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def probe(root: torch.nn.Module, graph: fx.Graph, example: torch.Tensor) -> Probe:
    """Run ``graph`` on ``example`` without gradients and record each node's output shape and FLOPs."""
    counter = mac_counter()
    recorder = _Recorder(root, graph, counter)
    with torch.no_grad(), counter:
        output = recorder.run(example)
    return Probe(recorder.shapes, recorder.flops, recorder.values, output)
