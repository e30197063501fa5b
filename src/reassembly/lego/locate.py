"""Component locating (MDA step 3): which channels of every layer a set of classes needs, over the real dataflow
graph.

Reads a model and its :class:`~reassembly.lego.contribution.Contributions`; writes :class:`ComponentMasks`, a JSON
record with, for every conv/linear layer, the input and output channels the component keeps (``keep_in`` /
``keep_out``, indices in the original numbering) and each chosen class's own relevant input channels before the
classes are joined. Nothing is pruned here; extraction reads this record.

The method (the official thresholds are the defaults): class ``c`` starts from its own logit. Going backwards, a
layer whose output channels ``q`` are relevant to ``c`` normalises each row ``A[c, q, :]`` over its inputs (min-max),
marks inputs above ``alpha`` as major contributors of ``q``, counts for every input ``p`` the relevant outputs it is a
major contributor of, normalises the counts over the inputs and keeps those above ``beta``. ``alpha``/``beta`` are
chosen by the kind of the layer whose inputs are masked (conv 0.3/0.2, linear 0.4/0.3).

Unlike the official code (a reversed module list that assumes a plain chain), the recursion runs over the traced
``torch.fx`` graph, tensor by tensor in reverse topological order:

* the relevance of a tensor is the OR of what all of its consumers ask of it, so a tensor read by a conv and a
  shortcut gets both demands (never a mask of one layer applied to another's channels);
* channel-preserving operations (batch norm, activations, pooling, dropout, spatial slicing) pass masks through;
  ``+``/``*`` of equally wide tensors give every operand the sum's demand; concatenation splits the mask into the
  inputs' channel ranges; zero-padding of channels (option-A ResNet shortcuts) drops the padded range; flattening
  into a classifier collapses a feature mask to its channels ("any feature of the channel");
* a depthwise conv passes its mask straight through (input ``i`` is output ``i``'s only input, where min-max
  normalisation over one input is undefined); a grouped conv normalises within each group.

Then the classes are joined (OR), and channels that must be pruned together are made to agree: the operands and the
result of an addition, a depthwise/grouped conv's input and output channels of one group (kept whole), and the
channels on both sides of a pass-through or a padding. The image input keeps all channels; the head keeps exactly
the chosen classes, in the order given. An operation the graph does not understand is an error naming it, never a
silently skipped layer.
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ReassemblyError
from ..io import atomic_path
from .contribution import Contributions, LayerContribution

FORMAT = "reassembly.lego.masks/1"
ALPHA = {"conv": 0.3, "linear": 0.4}
BETA = {"conv": 0.2, "linear": 0.3}
EPS = 1e-5

_SAME_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_SAME_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish,
    torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.batch_norm,
}
_SAME_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "detach"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv, torch.add,
                torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


# ------------------------------------------------------------------------------------------------ the mask record
@dataclass
class LayerMask:
    """What the component keeps of one conv/linear layer (channel indices in the original numbering)."""

    kind: str
    groups: int
    in_channels: int
    out_channels: int
    keep_in: list[int]
    keep_out: list[int]
    relevant_in: dict[str, list[int]] = field(default_factory=dict)  # class id -> its relevant inputs (uncoupled)


@dataclass
class ComponentMasks:
    """The located component of a model for ``classes``: a :class:`LayerMask` per layer, in call order."""

    classes: list[int]
    num_classes: int
    alpha: dict[str, float]
    beta: dict[str, float]
    input_size: list[int]
    layers: dict[str, LayerMask]
    model: str = ""
    kept_whole: list[str] = field(default_factory=list)  # layers told to keep every input (calibration's restore)

    def kept_fraction(self) -> dict[str, float]:
        return {name: len(l.keep_out) / l.out_channels for name, l in self.layers.items()}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ComponentMasks:
        if data.get("format") != FORMAT:
            raise ReassemblyError(f"not a component mask record (format {data.get('format')!r}, expected {FORMAT})")
        layers = {name: LayerMask(**info) for name, info in data["layers"].items()}
        fields = {k: data[k] for k in ("classes", "num_classes", "alpha", "beta", "input_size", "model")}
        return cls(layers=layers, kept_whole=list(data.get("kept_whole", [])), **fields)

    def save(self, path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> ComponentMasks:
        try:
            return cls.from_dict(json.loads(open(path).read()))
        except (OSError, json.JSONDecodeError) as error:
            raise ReassemblyError(f"cannot read the mask record {path}: {error}") from None


# ------------------------------------------------------------------------------------------- the channel-flow graph
@dataclass
class _Flow:
    """One tensor of the graph: its channel count, the layer that makes it (if any) and, for other operations, how
    each output channel maps to a channel of each tensor input (-1: none, e.g. zero padding)."""

    channels: int
    layer: str | None = None
    inputs: list[tuple[fx.Node, np.ndarray]] = field(default_factory=list)


def _where(node: fx.Node) -> str:
    source = node.meta.get("reassembly_source")
    return f"`{node.name}` ({node.op} {getattr(node.target, '__name__', node.target)})" + (
        f" at {source}" if source else "")


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _unsupported(node: fx.Node, why: str) -> ReassemblyError:
    return ReassemblyError(f"MDA's channel graph cannot follow {_where(node)}: {why}. Supported: conv/linear layers, "
                           "channel-wise operations, +/* of equal widths, concatenation, channel zero-padding, "
                           "flatten into a classifier")


def _same(node: fx.Node, source: fx.Node, channels: int) -> tuple[fx.Node, np.ndarray]:
    shape = _shape(source)
    if shape is None or len(shape) < 2 or shape[1] != channels:
        raise _unsupported(node, f"it changes the channel count ({shape} -> {channels} channels)")
    return source, np.arange(channels)


def _flatten(node: fx.Node, source: fx.Node, out_shape) -> tuple[fx.Node, np.ndarray]:
    shape = _shape(source)
    if len(out_shape) != 2 or shape is None or int(np.prod(shape[1:])) != out_shape[1]:
        raise _unsupported(node, f"only flattening (B, C, ...) to (B, C*...) is understood, not {shape} -> {out_shape}")
    return source, np.arange(out_shape[1]) // int(np.prod(shape[2:], dtype=np.int64))


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]


def _flow_of(node: fx.Node, modules: dict[str, nn.Module]) -> _Flow | None:
    shape = _shape(node)
    if node.op in ("placeholder", "get_attr"):
        return _Flow(shape[1] if shape and len(shape) > 1 else 0)
    if node.op == "output" or shape is None:
        return None
    if len(shape) < 2:
        raise _unsupported(node, f"its result has shape {shape}, with no channel axis")
    channels = shape[1]
    args = _tensor_args(node)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return _Flow(channels, layer=node.target, inputs=[(args[0], np.full(channels, -1))])
        if isinstance(module, _SAME_MODULES):
            return _Flow(channels, inputs=[_same(node, args[0], channels)])
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise _unsupported(node, "nn.Flatten with start_dim != 1")
            return _Flow(channels, inputs=[_flatten(node, args[0], shape)])
        raise _unsupported(node, f"module {node.target} ({type(module).__name__}) is not a known operation")
    target = node.target
    name = target if node.op == "call_method" else None
    if target in _SAME_FUNCTIONS or name in _SAME_METHODS:
        return _Flow(channels, inputs=[_same(node, args[0], channels)])
    if target in _ELEMENTWISE or name in _ELEMENTWISE_METHODS:
        inputs = []
        for arg in args:
            width = _shape(arg)[1] if len(_shape(arg)) > 1 else 1
            if width == channels:
                inputs.append((arg, np.arange(channels)))
            elif width != 1:
                raise _unsupported(node, f"operands of widths {width} and {channels}")
        return _Flow(channels, inputs=inputs)
    if target in (torch.flatten,) or name == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start != 1:
            raise _unsupported(node, f"flatten from dim {start}; only flatten(x, 1) is understood")
        return _Flow(channels, inputs=[_flatten(node, args[0], shape)])
    if name in ("view", "reshape") or target is torch.reshape:
        if shape == _shape(args[0]):
            return _Flow(channels, inputs=[_same(node, args[0], channels)])
        return _Flow(channels, inputs=[_flatten(node, args[0], shape)])
    if target in (torch.cat, torch.concat):
        pieces = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim < 0:
            dim += len(shape)
        if dim != 1:
            return _Flow(channels, inputs=[_same(node, p, channels) for p in pieces])
        inputs, offset = [], 0
        for piece in pieces:
            width = _shape(piece)[1]
            index = np.full(channels, -1)
            index[offset:offset + width] = np.arange(width)
            inputs.append((piece, index))
            offset += width
        return _Flow(channels, inputs=inputs)
    if target is F.pad:
        pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        source = args[0]
        if len(pad) <= 2 * (len(_shape(source)) - 2):
            return _Flow(channels, inputs=[_same(node, source, channels)])
        if len(pad) != 6 or len(_shape(source)) != 4 or mode != "constant":
            raise _unsupported(node, f"padding {pad} in mode {mode!r}")
        index = np.full(channels, -1)
        index[pad[4]:pad[4] + _shape(source)[1]] = np.arange(_shape(source)[1])
        return _Flow(channels, inputs=[(source, index)])
    if target is operator.getitem and args:
        item = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        full = slice(None, None, None)
        if len(item) >= 2 and item[0] == full and item[1] == full or len(item) == 1 and item[0] == full:
            return _Flow(channels, inputs=[_same(node, args[0], channels)])
        raise _unsupported(node, f"indexing with {item}; only spatial slicing keeps channels traceable")
    if name in _REDUCTIONS or target in (torch.mean, torch.sum, torch.amax):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        rank = len(_shape(args[0]))
        if dims and all(d % rank >= 2 for d in dims):
            return _Flow(channels, inputs=[_same(node, args[0], channels)])
        raise _unsupported(node, f"a reduction over dims {dims}")
    raise _unsupported(node, "not a known operation")


def channel_graph(model: nn.Module, input_size, model_name: str = "model") -> tuple[fx.Graph, dict[fx.Node, _Flow]]:
    """Trace ``model`` and describe how channels flow through every tensor of its graph (see the module docstring)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from ..graph.trace import trace

    traced = trace(model, model_name)
    if traced.opaque:
        raise ReassemblyError(f"{model_name}: torch.fx had to keep {traced.opaque[0]} whole; MDA needs every "
                              "conv/linear layer in the traced graph")
    was_training = model.training
    model.eval()
    try:
        gm = fx.GraphModule(traced.root, traced.graph)
        device = next(model.parameters()).device
        ShapeProp(gm).propagate(torch.zeros(2, *input_size, device=device))
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    flows = {}
    for node in gm.graph.nodes:
        flow = _flow_of(node, modules)
        if flow is not None:
            flows[node] = flow
    layers = [f.layer for f in flows.values() if f.layer]
    if len(layers) != len(set(layers)):
        shared = next(n for n in layers if layers.count(n) > 1)
        raise ReassemblyError(f"{model_name}: layer {shared} is called more than once; MDA cannot attribute the "
                              "channels of a shared layer")
    return gm.graph, flows


# ------------------------------------------------------------------------------------------------ the recursion
def relevant_inputs(contribution: LayerContribution, rows: list[int], out_mask: torch.Tensor, alpha: float,
                    beta: float) -> torch.Tensor:
    """One MDA step: the (len(rows), P) input mask of a layer whose relevant outputs are ``out_mask`` (len(rows), Q)."""
    n, q = out_mask.shape
    g = contribution.groups
    pg = contribution.total.shape[-1]
    if g > 1 and pg == 1:  # depthwise: each output has one input, which is relevant exactly when an output is
        return out_mask.reshape(n, g, q // g).any(-1)
    major = (contribution.normalised(rows, EPS) > alpha).double().reshape(n, g, q // g, pg)
    counts = torch.einsum("ngq,ngqp->ngp", out_mask.double().reshape(n, g, q // g), major).reshape(n, g * pg)
    low, high = counts.amin(1, keepdim=True), counts.amax(1, keepdim=True)
    keep = (counts - low) / (high - low + EPS) > beta
    # every input equally relevant (min == max > 0): min-max gives 0 everywhere; keep them all instead of none
    return keep | ((high > 0) & (high == low))


def _check_classes(classes, contributions: Contributions, model_name: str) -> list[int]:
    classes = list(classes) if classes is not None else []
    if not classes:
        raise ReassemblyError(f"{model_name}: the class list is empty; name at least one class to disassemble for")
    n = contributions.num_classes
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) and not (isinstance(c, torch.Tensor)
                                                                                 and c.ndim == 0):
            raise ReassemblyError(f"{model_name}: class {c!r} is not an integer class index")
        if not 0 <= int(c) < n:
            raise ReassemblyError(f"{model_name}: class {int(c)} is out of range; the model has {n} classes "
                                  f"(0..{n - 1})")
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ReassemblyError(f"{model_name}: the class list {classes} names a class twice")
    empty = [c for c in classes if contributions.samples[c] == 0]
    if empty:
        raise ReassemblyError(f"{model_name}: class {empty[0]} has no samples in the contributions; select samples "
                              "of every class you disassemble for")
    return classes


def locate_component(model: nn.Module, contributions: Contributions, classes, *, input_size=(3, 32, 32),
                     alpha: dict | None = None, beta: dict | None = None, model_name: str = "model",
                     graph=None, keep_whole=()) -> ComponentMasks:
    """The channels of every conv/linear layer of ``model`` that the component for ``classes`` keeps (MDA step 3).

    ``alpha``/``beta`` override the official thresholds per layer kind (``{"conv": ..., "linear": ...}``).
    ``graph``: the result of :func:`channel_graph` for this model and input size, to trace it only once when
    locating many times. ``keep_whole``: names of layers that keep every input channel, as if each chosen class
    relied on all of them; their producers are then located for the full demand (threshold calibration uses this to
    restore the layers whose pruning costs accuracy)."""
    alpha, beta = {**ALPHA, **(alpha or {})}, {**BETA, **(beta or {})}
    classes = _check_classes(classes, contributions, model_name)
    graph, flows = graph if graph is not None else channel_graph(model, tuple(input_size), model_name)
    n = len(classes)
    output = next(node for node in graph.nodes if node.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node) or logits not in flows:
        raise ReassemblyError(f"{model_name}: the model must return one logits tensor, not {type(logits).__name__}")
    if flows[logits].channels != contributions.num_classes:
        raise ReassemblyError(f"{model_name} outputs {flows[logits].channels} logits but the contributions cover "
                              f"{contributions.num_classes} classes; compute them on the same model")
    keep_whole = list(dict.fromkeys(keep_whole))
    layer_names = {f.layer for f in flows.values() if f.layer}
    unknown = [name for name in keep_whole if name not in layer_names]
    if unknown:
        raise ReassemblyError(f"{model_name}: keep_whole names {unknown[0]!r}, which is not a conv/linear layer of "
                              "the model")
    missing = [f.layer for f in flows.values() if f.layer and f.layer not in contributions.layers]
    if missing:
        raise ReassemblyError(f"{model_name}: no contributions for layer {missing[0]}; compute them on this model "
                              "with every layer")

    # 1. relevance, per class, tensor by tensor from the logits back to the image
    demand: dict[fx.Node, torch.Tensor] = {logits: torch.zeros(n, flows[logits].channels, dtype=torch.bool)}
    demand[logits][torch.arange(n), torch.tensor(classes)] = True
    relevant: dict[str, torch.Tensor] = {}
    for node in reversed(list(flows)):
        flow, wanted = flows[node], demand.get(node)
        if wanted is None:
            continue
        inputs = flow.inputs
        if flow.layer:
            contribution = contributions.layers[flow.layer]
            kind = contribution.kind
            source = inputs[0][0]
            if flow.layer in keep_whole:
                mask = torch.ones(n, flows[source].channels, dtype=torch.bool)
            else:
                mask = relevant_inputs(contribution, classes, wanted, alpha[kind], beta[kind])
            relevant[flow.layer] = mask
            inputs = [(source, None)]
        for source, index in inputs:
            into = demand.setdefault(source, torch.zeros(n, flows[source].channels, dtype=torch.bool))
            if index is None:
                into |= mask
                continue
            valid = torch.from_numpy(index >= 0)
            spread = torch.zeros(n, flows[source].channels)
            spread.index_add_(1, torch.from_numpy(index[index >= 0]), wanted[:, valid].float())
            into |= spread > 0

    # 2. coupling: channels that must be kept or removed together share a slot
    slots, edges, count = {}, [], 0
    for node, flow in flows.items():
        out = np.full(flow.channels, -1)
        for source, index in flow.inputs if not flow.layer else []:
            mapped = np.where(index >= 0, slots[source][np.maximum(index, 0)], -1)
            fresh = (out < 0) & (mapped >= 0)
            both = (out >= 0) & (mapped >= 0)
            edges += list(zip(out[both], mapped[both]))
            out[fresh] = mapped[fresh]
        free = out < 0
        out[free] = np.arange(count, count + free.sum())
        count += int(free.sum())
        slots[node] = out
        if flow.layer and isinstance(contributions.layers[flow.layer], LayerContribution):
            g = contributions.layers[flow.layer].groups
            if g > 1:  # a group's inputs and outputs go together
                ins = slots[flow.inputs[0][0]].reshape(g, -1)
                outs = out.reshape(g, -1)
                members = np.concatenate([ins, outs], axis=1)
                edges += [(row[0], m) for row in members for m in row[1:]]
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
    adjacency = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    _, component = connected_components(adjacency, directed=False)
    keep = np.zeros(component.max() + 1 if count else 0, dtype=bool)
    for node, wanted in demand.items():
        keep[component[slots[node][wanted.any(0).numpy()]]] = True
    for node in flows:
        if node.op == "placeholder":
            keep[component[slots[node]]] = True  # the image keeps its channels

    # 3. the record
    layers = {}
    for node, flow in flows.items():
        if not flow.layer:
            continue
        contribution = contributions.layers[flow.layer]
        keep_in = np.flatnonzero(keep[component[slots[flow.inputs[0][0]]]]).tolist()
        keep_out = np.flatnonzero(keep[component[slots[node]]]).tolist()
        if node is logits:
            keep_out = list(classes)  # exactly the chosen classes, in the order given
        if not keep_out or not keep_in:
            raise ReassemblyError(f"{model_name}: the component for classes {classes} keeps no "
                                  f"{'output' if not keep_out else 'input'} channel of layer {flow.layer}; lower "
                                  "alpha/beta or select more samples")
        per_class = relevant.get(flow.layer, torch.zeros(n, 0, dtype=torch.bool))
        layers[flow.layer] = LayerMask(
            contribution.kind, contribution.groups, contribution.in_channels, contribution.out_channels, keep_in,
            keep_out, {str(c): torch.nonzero(per_class[i])[:, 0].tolist() for i, c in enumerate(classes)})
    return ComponentMasks(classes, contributions.num_classes, alpha, beta, list(input_size), layers, model_name,
                          keep_whole)
