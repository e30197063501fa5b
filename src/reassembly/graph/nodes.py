"""Per-node metadata: readable names, the modules a node covers, shapes, layout, parameters and MACs.

Parameters are counted once per chain: a module or parameter used by several nodes (weight sharing) is attributed to
the first node that uses it, so the nodes' counts add up to the parameters the forward actually touches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.fx as fx
import torch.nn as nn

from .cuts import Dataflow
from .layout import describe
from .plan import Segment
from .probe import Probe
from .trace import SCOPE


@dataclass(frozen=True)
class NodeInfo:
    """One atomic node of a chain. Shapes exclude the batch dimension; ``macs`` are multiply-accumulates per sample
    (conv, linear, matmul, attention); ``reduction`` is input height over feature height (patch size for tokens).
    ``grid`` is the (height, width) of the output map or patch-token grid and ``prefix_tokens`` the number of tokens
    ahead of that grid (class tokens; 0 for maps): what stitching needs to turn tokens into a map and back. The
    ``in_`` fields describe the input side the same way."""

    index: int
    name: str
    kind: str  # stem | body | head
    modules: tuple[str, ...]
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    in_format: str
    format: str
    in_channels: int | None
    channels: int | None
    in_reduction: float | None
    reduction: float | None
    in_grid: tuple[int, int] | None
    grid: tuple[int, int] | None
    in_prefix_tokens: int
    prefix_tokens: int
    params: int
    macs: int

    def to_dict(self) -> dict:
        record = asdict(self)
        for key in ("modules", "in_shape", "out_shape", "in_grid", "grid"):
            record[key] = None if record[key] is None else list(record[key])
        return record


def segment_nodes(flow: Dataflow, segment: Segment) -> list[fx.Node]:
    return flow.order[segment.start + 1 : segment.end + 1]


def constant_owners(flow: Dataflow, segments: list[Segment]) -> list[list[fx.Node]]:
    """For each segment, the input-independent nodes (parameters, constants) it is the first to need."""
    owned: list[list[fx.Node]] = [[] for _ in segments]
    claimed: set[fx.Node] = set()
    for index, segment in enumerate(segments):
        stack = [arg for node in segment_nodes(flow, segment) for arg in node.all_input_nodes]
        while stack:
            node = stack.pop()
            if node in flow.constants and node not in claimed:
                claimed.add(node)
                owned[index].append(node)
                stack.extend(node.all_input_nodes)
    return owned


def _calls(node: fx.Node) -> tuple[tuple[str, int], ...]:
    """The module calls enclosing ``node``, outermost first; a parameter read counts as a call of the parameter."""
    scope = node.meta.get(SCOPE, ())
    return (*scope, (node.target, 0)) if node.op == "get_attr" else scope


def _covered_modules(members: list[list[fx.Node]]) -> list[tuple[str, ...]]:
    """Per segment, the outermost module calls whose every operation lies in that segment (else the innermost call),
    as module paths in order of first use."""
    touched: dict[tuple[str, int], set[int]] = {}
    for index, nodes in enumerate(members):
        for node in nodes:
            for call in _calls(node):
                touched.setdefault(call, set()).add(index)
    covered = []
    for index, nodes in enumerate(members):
        listed: dict[str, None] = {}
        for node in nodes:
            calls = _calls(node)
            if not calls:
                continue
            path = next((path for path, _ in (c for c in calls if touched[c] == {index})), calls[-1][0])
            if not any(path == done or path.startswith(f"{done}.") for done in listed):
                listed[path] = None
        covered.append(tuple(listed))
    return covered


def _parameters(root: nn.Module, node: fx.Node) -> list[nn.Parameter]:
    if node.op == "call_module":
        return list(root.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        owner, _, name = node.target.rpartition(".")
        value = getattr(root.get_submodule(owner), name)
        if isinstance(value, nn.Parameter):
            return [value]
        if isinstance(value, nn.Module):
            return list(value.parameters())
    return []


def _names(covered: list[tuple[str, ...]], members: list[list[fx.Node]]) -> list[str]:
    names, seen = [], {}
    for modules, nodes in zip(covered, members):
        if len(modules) == 1:
            name = modules[0]
        elif modules:
            name = f"{modules[0]}..{modules[-1]}"
        else:
            name = nodes[0].name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}@{seen[name] - 1}")
    return names


def describe_nodes(
    root: nn.Module, flow: Dataflow, probe: Probe, segments: list[Segment], input_size: tuple[int, ...]
) -> list[NodeInfo]:
    """Metadata for every segment of a planned chain."""
    owners = constant_owners(flow, segments)
    graph_order = {node: index for index, node in enumerate(flow.output.graph.nodes)}
    members = [
        sorted(segment_nodes(flow, segment) + owned, key=graph_order.__getitem__)
        for segment, owned in zip(segments, owners)
    ]
    covered = _covered_modules(members)
    names = _names(covered, members)
    batch = probe.shapes[flow.order[0]][0]
    counted: set[int] = set()
    infos = []
    for index, segment in enumerate(segments):
        params = 0
        for node in members[index]:
            for parameter in _parameters(root, node):
                if id(parameter) not in counted:
                    counted.add(id(parameter))
                    params += parameter.numel()
        flops = sum(probe.flops.get(node, 0) for node in members[index])
        in_shape = _unbatched(probe, flow.value_after(segment.start))
        out_shape = _unbatched(probe, flow.value_after(segment.end))
        source, target = describe(in_shape, input_size), describe(out_shape, input_size)
        infos.append(
            NodeInfo(
                index=index,
                name=names[index],
                kind=segment.kind,
                modules=covered[index],
                in_shape=in_shape,
                out_shape=out_shape,
                in_format=source.format,
                format=target.format,
                in_channels=source.channels,
                channels=target.channels,
                in_reduction=source.reduction,
                reduction=target.reduction,
                in_grid=source.grid,
                grid=target.grid,
                in_prefix_tokens=source.prefix_tokens,
                prefix_tokens=target.prefix_tokens,
                params=params,
                macs=flops // (2 * batch),
            )
        )
    return infos


def _unbatched(probe: Probe, value) -> tuple[int, ...] | None:
    shape = probe.shapes.get(value) if isinstance(value, fx.Node) else None
    return None if shape is None else shape[1:]
