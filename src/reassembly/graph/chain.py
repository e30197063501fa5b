"""The node chain: atomic nodes with metadata, and runnable blocks cut out of the model's own graph.

A block ``chain[i:j]`` is an ``fx.GraphModule`` holding *references* to the model's submodules and parameters, so
training a block trains the model, and its ``state_dict`` keys are the model's own (``layer1.0.conv1.weight``). Its
training mode is the model's too (see :class:`ChainBlock`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

from .cuts import Dataflow
from .errors import RecompositionError
from .nodes import NodeInfo, segment_nodes
from .plan import Segment
from .sizes import SizeRecipe
from .trace import SCOPE

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
}  # fmt: skip


class ChainBlock(fx.GraphModule):
    """A run of chain nodes whose training mode is the model's.

    The operations a block runs belong to the forwards of model modules (``owners``) that are not submodules of the
    block, so the block's own flag would go stale: ``training`` reads the owners' flags (``model.train()`` puts the
    block in training mode), and ``train()``/``eval()`` set them as well as those of the submodules the block calls,
    as ``model.train()`` would for that part of the model. Traced code that passed ``self.training`` on reads the
    owner's flag when the block runs (see :class:`~reassembly.graph.trace.TrainingFlag`)."""

    owners: tuple[nn.Module, ...] = ()
    fixed_input_shape: tuple[int, ...] | None = None  # the only input shape it runs at (sizes fixed at dissection)

    @property
    def training(self) -> bool:
        return any(owner.training for owner in self.owners)

    @training.setter
    def training(self, mode: bool) -> None:
        for owner in self.owners:  # none yet while nn.Module.__init__ sets the flag
            owner.training = mode

    def __deepcopy__(self, memo: dict) -> ChainBlock:
        copied = super().__deepcopy__(memo)  # rebuilt from the graph: plain attributes are dropped
        copied.node_names = list(self.node_names)
        copied.owners = copy.deepcopy(self.owners, memo)  # the copies of the modules the copied block calls
        copied.fixed_input_shape = self.fixed_input_shape
        return copied


class NodeChain:
    """A model dissected into an ordered chain of atomic nodes.

    ``len(chain)`` nodes; ``chain[i]`` is a :class:`NodeInfo`; ``chain[i:j]`` is an ``nn.Module`` (an
    ``fx.GraphModule`` whose ``node_names`` lists the nodes it runs) that maps the output of node ``i-1`` (the model
    input when ``i == 0``) to the output of node ``j-1``. Running ``chain[0:k]`` then ``chain[k:len(chain)]``
    reproduces the model."""

    def __init__(
        self,
        model: nn.Module,
        root: nn.Module,
        flow: Dataflow,
        segments: list[Segment],
        nodes: list[NodeInfo],
        *,
        name: str,
        input_size: tuple[int, ...],
        granularity: str,
        method: str,
        opaque: tuple[str, ...] = (),
        sizes: dict[fx.Node, SizeRecipe] | None = None,
    ):
        self.model = model
        self.name = name
        self.input_size = input_size
        self.granularity = granularity
        self.method = method
        self.opaque = opaque  # modules kept whole because torch.fx could not trace them
        self.nodes = nodes
        self._root = root
        self._flow = flow
        self._segments = segments
        self._sizes = sizes or {}  # how a block recomputes a size read from a shape before its input
        self._blocks: dict[tuple[int, int], ChainBlock] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[NodeInfo]:
        return iter(self.nodes)

    def __getitem__(self, key: int | slice) -> NodeInfo | ChainBlock:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a block is a contiguous run of nodes; slices cannot have a step")
            return self.block(start, stop)
        return self.nodes[key]

    def __repr__(self) -> str:
        return f"NodeChain({self.name}, {len(self)} nodes, granularity={self.granularity!r})"

    @property
    def params(self) -> int:
        return sum(node.params for node in self.nodes)

    @property
    def macs(self) -> int:
        return sum(node.macs for node in self.nodes)

    def index(self, name: str) -> int:
        """Position of the node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node.index
        raise KeyError(f"{self.name} has no node named {name!r}; nodes: {[node.name for node in self.nodes]}")

    def block(self, start: int, stop: int) -> ChainBlock:
        """An ``nn.Module`` running nodes ``start .. stop-1`` (sharing the model's parameters; built once)."""
        if not 0 <= start < stop <= len(self):
            raise IndexError(f"block [{start}:{stop}] is empty or outside the chain of {len(self)} nodes")
        if (start, stop) not in self._blocks:
            self._blocks[start, stop] = self._build_block(start, stop)
        return self._blocks[start, stop]

    def _build_block(self, start: int, stop: int) -> ChainBlock:
        flow = self._flow
        graph = fx.Graph()
        entry = graph.placeholder("x")
        env: dict[fx.Node, object] = {flow.value_after(self._segments[start].start): entry}
        fixed: list[str] = []  # sizes taken as constants: they hold at the input size of the dissection only

        def lookup(node: fx.Node) -> object:
            if node not in env:  # parameters, constants and sizes are recomputed wherever they are needed
                if node in self._sizes:
                    env[node] = recompute(node)
                elif node in flow.constants:
                    env[node] = graph.node_copy(node, lookup)
                else:
                    raise AssertionError(f"node {node.name} crosses a cut that was deemed legal")
            return env[node]

        def recompute(node: fx.Node) -> object:
            recipe = self._sizes[node]
            if recipe.how == "batch":
                return graph.call_method("size", (entry, 0))
            if recipe.how == "constant":
                fixed.append(node.name)
                return recipe.value
            return graph.node_copy(node, lookup)

        for segment in self._segments[start:stop]:
            for node in segment_nodes(flow, segment):
                unread = [arg for arg in node.all_input_nodes if arg in flow.position and arg not in env]
                if node in flow.sizes and any(arg not in flow.sizes for arg in unread):
                    env[node] = recompute(node)  # reads the shape of a tensor that stayed in an earlier block
                else:
                    env[node] = graph.node_copy(node, lookup)
        result = flow.value_after(self._segments[stop - 1].end)
        graph.output(fx.map_arg(result, lookup))
        _protect_input(graph, entry, self._root)
        if fixed:
            shape = self.nodes[start].in_shape
            message = (
                f"{self.name}: block [{start}:{stop}] takes sizes its model read from tensor shapes "
                f"({', '.join(fixed)}) as fixed by the input size {self.input_size}, so its input must have shape "
                f"{shape} (without batch)"
            )
            with graph.inserting_after(entry):
                graph.call_function(_check_input_shape, (entry, shape, message))
        block = ChainBlock(self._root, graph, class_name="ChainBlock")
        block.node_names = [node.name for node in self.nodes[start:stop]]
        block.owners = self._owners(self._segments[start:stop])
        block.fixed_input_shape = self.nodes[start].in_shape if fixed else None
        return block

    def _owners(self, segments: list[Segment]) -> tuple[nn.Module, ...]:
        """The model modules whose forward code makes the operations of ``segments`` (the model itself for top-level
        operations); a called leaf module is not its own owner but a submodule of the block."""
        paths: dict[str, None] = {}
        for segment in segments:
            for node in segment_nodes(self._flow, segment):
                calls = node.meta.get(SCOPE, ())
                calls = calls[:-1] if node.op == "call_module" else calls
                paths[calls[-1][0] if calls else ""] = None
        return tuple(self.model.get_submodule(path) for path in paths)

    def split(self, boundaries: list[int]) -> nn.ModuleList:
        """Consecutive blocks ``[0:b1], [b1:b2], ..., [bk:len]`` for node indices ``boundaries``."""
        bounds = [0, *boundaries, len(self)]
        return nn.ModuleList(self.block(a, b) for a, b in zip(bounds[:-1], bounds[1:]))

    def to_dict(self) -> dict:
        """JSON-ready description: model, input size, granularity, totals and one record per node."""
        return {
            "model": self.name,
            "input_size": list(self.input_size),
            "granularity": self.granularity,
            "method": self.method,
            "opaque": list(self.opaque),
            "params": self.params,
            "macs": self.macs,
            "nodes": [node.to_dict() for node in self.nodes],
        }

    def verify(self, x: torch.Tensor, tolerance: float = 1e-5) -> float:
        """Check recomposition and recorded shapes on ``x``; return the relative error (see :func:`verify`)."""
        from .verify import verify

        return verify(self, self.model, x, tolerance=tolerance)

    def summary(self) -> str:
        """A fixed-width table of the nodes, for people."""
        rows = [f"{'#':>3} {'kind':<5} {'name':<32} {'out_shape':<18} {'red':>5} {'params':>11} {'MACs':>14}"]
        for node in self.nodes:
            shape = "x".join(map(str, node.out_shape)) if node.out_shape else "-"
            reduction = "-" if node.reduction is None else f"{node.reduction:g}"
            rows.append(
                f"{node.index:>3} {node.kind:<5} {node.name[:32]:<32} {shape:<18} {reduction:>5} "
                f"{node.params:>11,} {node.macs:>14,}"
            )
        rows.append(f"{'':>3} {'total':<5} {'':<32} {'':<18} {'':>5} {self.params:>11,} {self.macs:>14,}")
        return "\n".join(rows)


def _check_input_shape(x: torch.Tensor, shape: tuple[int, ...], message: str) -> None:
    """The first operation of a block that uses sizes fixed at the chain's input size: another input shape would
    silently get the wrong sizes."""
    if tuple(x.shape[1:]) != shape:
        raise RecompositionError(f"{message}, not {tuple(x.shape[1:])}")


def _mutates_first_argument(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or (
            name.endswith("_") and not name.startswith("_")
        )
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


def _protect_input(graph: fx.Graph, entry: fx.Node, root: nn.Module) -> None:
    """Clone the block input if the block would modify it in place (the caller may still hold that tensor)."""
    if not any(user.args and user.args[0] is entry and _mutates_first_argument(user, root) for user in entry.users):
        return
    with graph.inserting_after(entry):
        copy = graph.call_method("clone", (entry,))
    entry.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
