"""Which legal cuts become node boundaries: the stem, body and head of a chain at a chosen granularity.

* **head**: from the global pooling / token selection on, i.e. after the legal cut whose tensor is consumed, for the
  last time, by an operation that removes its grid or token axis; a final norm that feeds it (a ViT's LayerNorm)
  and a slice dropping the prefix tokens before averaging open the head too.
* **block** (default): one body node per call of a *block-like* module: a traced-through module in a container
  whose children are all traced-through modules (``layer1.0``, ``blocks.3``, ``features.5``), the outermost such
  call unless it is a bare container or a stage holding a row of residual blocks (``stages.1`` opens into
  ``stages.1.blocks.0``...). Elsewhere (plain chains like VGG, blocks whose parent is no container such as RegNet
  stages) one node per weighted layer with its norm, activation and pooling, or per run of operations with no legal
  cut inside (a residual block); a custom module's own layers stay together. Weightless nodes (a DenseNet's last
  norm and activation) join their neighbour. The **stem** is the first node.
* **stage**: block nodes grouped where the spatial reduction changes (a node that reduces first and then computes
  opens a stage; one that computes and then pools closes it).
* **fine**: every legal cut in the body.
* **cuts by module name**: a boundary after the last operation of each named module, and the head cut (a named cut
  cannot split the head).
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .cuts import Dataflow
from .errors import DissectionError
from .layout import describe, grid_cells, is_spatial
from .probe import Probe
from .trace import SCOPE, Call

GRANULARITIES = ("block", "stage", "fine")

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
)  # fmt: skip
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    torch.mean, torch.amax, torch.max, torch.sum,
}  # fmt: skip
_POOL_METHODS = {"mean", "amax", "max", "sum"}
_NORM_MODULES = tuple(
    getattr(nn, name)
    for name in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
        "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm",
    )
    if hasattr(nn, name)  # RMSNorm is newer than the oldest supported torch
)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """Chain node covering state positions ``start+1 .. end`` (``start`` 0 is the model input)."""

    start: int
    end: int
    kind: str


@dataclass
class _Context:
    model: nn.Module
    flow: Dataflow
    probe: Probe
    input_size: tuple[int, ...]
    flops: np.ndarray  # per state position

    def reduction_after(self, position: int) -> float | None:
        """Spatial reduction of the value crossing the boundary after ``position``."""
        node = self.flow.value_after(position)
        shape = self.probe.shapes.get(node) if isinstance(node, fx.Node) else None
        return None if shape is None else describe(shape[1:], self.input_size).reduction


def plan(
    model: nn.Module,
    flow: Dataflow,
    probe: Probe,
    input_size: tuple[int, ...],
    granularity: str,
    cut_names: list[str] | None,
) -> list[Segment]:
    """Split the state positions of ``flow`` into stem, body and head segments."""
    flops = np.array([probe.flops.get(node, 0) for node in flow.order], dtype=np.int64)
    context = _Context(model, flow, probe, input_size, flops)
    head = _head_cut(context)
    if cut_names is not None:
        cuts = _named_cuts(context, cut_names, head)
        return _label(cuts if head is None or head in cuts else sorted([*cuts, head]), head, len(flow.order) - 1)
    blocks = _merge_weightless(context, _block_cuts(context, head), head)
    if granularity == "block":
        return _label(blocks, head, len(flow.order) - 1)
    body_end = head if head is not None else len(flow.order) - 1
    stem_end = blocks[0] if blocks and blocks[0] < body_end else None
    if granularity == "fine":
        first = stem_end if stem_end is not None else 0
        cuts = ([stem_end] if stem_end is not None else []) + [p for p in flow.cuts if first < p < body_end]
    else:
        cuts = _stage_cuts(context, blocks, stem_end, body_end)
    if head is not None:
        cuts.append(head)
    return _label(sorted(set(cuts)), head, len(flow.order) - 1)


def _label(cuts: list[int], head: int | None, last: int) -> list[Segment]:
    """Segments between ``cuts``; those past the head cut are the head, the first of several others the stem."""
    bounds = [0, *cuts, last]
    spans = list(zip(bounds[:-1], bounds[1:]))
    body_count = sum(1 for _, end in spans if head is None or end <= head)
    segments = []
    for index, (start, end) in enumerate(spans):
        if head is not None and end > head:
            kind = "head"
        elif index == 0 and body_count > 1:
            kind = "stem"
        else:
            kind = "body"
        segments.append(Segment(start, end, kind))
    return segments


def _is_pooling(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    return node.op == "call_method" and node.target in _POOL_METHODS


def _head_cut(context: _Context) -> int | None:
    """The legal cut before the first operation that removes the grid/token axis of the whole state, if any, or
    earlier where a final norm feeds that operation (see :func:`_head_start`)."""
    flow, shapes = context.flow, context.probe.shapes
    batch = shapes[flow.order[0]][0]
    for node in flow.order[1:]:
        tensors = [arg for arg in node.all_input_nodes if arg in flow.position and shapes.get(arg) is not None]
        out_shape = shapes.get(node)
        if len(tensors) != 1 or out_shape is None or out_shape[0] != batch:
            continue
        source = tensors[0]
        cut = flow.cut_of(source)
        if cut is None or flow.last_use[flow.position[source]] != flow.position[node]:
            continue
        source_layout = describe(shapes[source][1:], context.input_size)
        if shapes[source][0] != batch or not is_spatial(source_layout):
            continue
        out = out_shape[1:]
        pooled = _is_pooling(node, context.model) and grid_cells(out, describe(out, context.input_size)) == 1
        if len(out) == 1 or pooled:
            return _head_start(context, cut)
    return None


def _head_start(context: _Context, cut: int) -> int:
    """Where the head begins, given the legal cut before the pooling or token selection: earlier, over a slice that
    drops prefix tokens before averaging (``x[:, 1:].mean(1)``) and over a final norm that feeds these (a ViT's,
    Swin's or Mixer's LayerNorm), so that they go to the head rather than into the last block."""
    flow = context.flow
    while (index := bisect.bisect_left(flow.cuts, cut)) > 0:
        before = flow.cuts[index - 1]
        span = flow.order[before + 1 : cut + 1]
        if _drops_prefix_tokens(context, span):
            cut = before
        elif _is_final_norm(context, flow.order[before], span):
            return before
        else:
            break
    return cut


def _drops_prefix_tokens(context: _Context, span: list[fx.Node]) -> bool:
    shapes = context.probe.shapes
    if len(span) != 1 or span[0].op != "call_function" or span[0].target is not operator.getitem:
        return False
    source, out = shapes.get(span[0].args[0]), shapes.get(span[0])
    if source is None or out is None:
        return False
    before, after = describe(source[1:], context.input_size), describe(out[1:], context.input_size)
    return before.format == after.format == "tokens" and before.grid == after.grid and after.prefix_tokens == 0


def _is_final_norm(context: _Context, producer: fx.Node, span: list[fx.Node]) -> bool:
    """Whether ``span`` is one call of a norm module that is not part of the layer before it (``producer``): a norm
    whose module call encloses that layer (conv and norm in one Sequential, or both at the top level) is its own."""
    enclosing = _common_prefix([node.meta.get(SCOPE, ()) for node in span])
    norm = next((depth for depth, (path, _) in enumerate(enclosing) if _is_norm(context.model, path)), None)
    if norm is None:
        return False
    calls = producer.meta.get(SCOPE, ())
    owners = calls[:-1] if producer.op == "call_module" else calls  # the module calls whose forward made the tensor
    return bool(owners) and owners[-1] not in enclosing[:norm]


def _is_norm(model: nn.Module, path: str) -> bool:
    return isinstance(model.get_submodule(path), _NORM_MODULES)


def _common_prefix(scopes: list[tuple[Call, ...]]) -> tuple[Call, ...]:
    """The module calls that enclose every one of ``scopes``, outermost first."""
    prefix = scopes[0]
    for scope in scopes[1:]:
        depth = 0
        while depth < min(len(prefix), len(scope)) and prefix[depth] == scope[depth]:
            depth += 1
        prefix = prefix[:depth]
    return prefix


def _block_like_paths(model: nn.Module, flow: Dataflow) -> set[str]:
    """Traced-through modules that sit in a *row*: a container whose children are all traced-through modules
    (parameter-free leaves such as pooling aside). A Sequential mixing blocks with convolutions is not a row."""
    called = {path for node in flow.order for path, _ in node.meta.get(SCOPE, ())}
    traced = called - {node.target for node in flow.order if node.op == "call_module"} - {""}
    rows: dict[str, bool] = {}
    found = set()
    for path in traced:
        parent_path = path.rpartition(".")[0]
        if parent_path not in rows:
            parent = model.get_submodule(parent_path)
            rows[parent_path] = isinstance(parent, _CONTAINERS) and all(
                f"{parent_path}.{name}".lstrip(".") in traced or not any(True for _ in child.parameters())
                for name, child in parent.named_children()
            )
        if rows[parent_path]:
            found.add(path)
    return found


def _atomic_blocks(context: _Context, blocks: list[tuple[Call, ...]]) -> set[Call]:
    """The block-like calls that become nodes, found top-down. A call is opened up (its block-like children become
    candidates instead) when it is a bare container, or when it holds a row of residual blocks: two or more children
    of one class, each with several weighted layers and no legal cut between them (a stage). A block holding
    conv-norm-act layers and one squeeze-excite (an inverted residual) stays whole."""
    span: dict[Call, list[int]] = {}
    children: dict[Call | None, list[Call]] = {}
    for position, scope in enumerate(blocks):
        for depth, call in enumerate(scope):
            if call not in span:
                span[call] = [position, position]
                children.setdefault(scope[depth - 1] if depth else None, []).append(call)
            span[call][1] = position
    cuts = np.array(context.flow.cuts, dtype=np.int64)
    weighted = np.flatnonzero(context.flops > 0)

    def is_residual(call: Call) -> bool:
        first, last = span[call]
        inside = weighted[(weighted >= first) & (weighted <= last)]
        if len(inside) < 2:
            return False
        index = np.searchsorted(cuts, inside[0])
        return not (index < len(cuts) and cuts[index] < inside[-1])

    def holds_residual_row(call: Call) -> bool:
        kinds = [type(context.model.get_submodule(child[0])) for child in children.get(call, []) if is_residual(child)]
        return len(kinds) > len(set(kinds))

    atomic: set[Call] = set()
    pending = list(children.get(None, []))
    while pending:
        call = pending.pop()
        if type(context.model.get_submodule(call[0])) in _CONTAINERS or holds_residual_row(call):
            pending.extend(children.get(call, []))
        else:
            atomic.add(call)
    return atomic


def _block_cuts(context: _Context, head: int | None) -> list[int]:
    flow = context.flow
    block_like = _block_like_paths(context.model, flow)
    leaves = {node.target for node in flow.order if node.op == "call_module"}
    scopes = [node.meta.get(SCOPE, ()) for node in flow.order]
    blocks = [tuple(call for call in scope if call[0] in block_like) for scope in scopes]
    modules = [tuple(call for call in scope if call[0] not in leaves) for scope in scopes]
    atomic = _atomic_blocks(context, blocks)
    blocks = [_down_to_atomic(scope, atomic) for scope in blocks]
    inside = [bool(scope) and scope[-1] in atomic for scope in blocks]
    plain = _plain_cuts(context, modules, [p for p in flow.cuts if blocks[p] == blocks[p + 1] and not inside[p]])
    weight_count = np.cumsum(context.flops > 0)
    kept: list[int] = []
    for p in flow.cuts:
        if p == head or blocks[p] != blocks[p + 1]:
            kept.append(p)
        elif p in plain and weight_count[p] > weight_count[kept[-1] if kept else 0]:
            kept.append(p)
    return kept


def _plain_cuts(context: _Context, modules: list[tuple[Call, ...]], cuts: list[int]) -> set[int]:
    """Outside blocks, one cut between consecutive weighted layers (conv, linear): at the last module-call boundary
    between them if there is one (so a pre-activation norm goes with its conv, as in a DenseNet transition), else
    just before the later layer (so pooling trails its conv, as in VGG). Inside a module that is not a bare container,
    cuts are only taken between its submodule calls: its own layers stay together (a SqueezeNet Fire module)."""
    next_weighted = _next_true(context.flops > 0)
    chosen: dict[int, tuple[bool, int]] = {}  # next weighted position -> (at a module boundary, cut)
    for p in cuts:
        if next_weighted[p] < 0 or _inside_own_forward(context.model, modules[p], modules[p + 1]):
            continue
        candidate = (modules[p] != modules[p + 1], p)
        chosen[next_weighted[p]] = max(chosen.get(next_weighted[p], candidate), candidate)
    return {p for _, p in chosen.values()}


def _inside_own_forward(model: nn.Module, before: tuple[Call, ...], after: tuple[Call, ...]) -> bool:
    """Whether both sides of a cut lie in the forward of the same module (not a bare container) rather than in
    different submodule calls of it."""
    depth = 0
    while depth < min(len(before), len(after)) and before[depth] == after[depth]:
        depth += 1
    owners = [index for index in range(depth) if type(model.get_submodule(before[index][0])) not in _CONTAINERS]
    if not owners:
        return False
    child = owners[-1] + 1
    return before[child : child + 1] == after[child : child + 1]


def _down_to_atomic(scope: tuple[Call, ...], atomic: set[Call]) -> tuple[Call, ...]:
    """The block-like calls of ``scope`` down to the first atomic one (what lies inside a block is not a boundary)."""
    for depth, call in enumerate(scope):
        if call in atomic:
            return scope[: depth + 1]
    return scope


def _next_true(flags: np.ndarray) -> np.ndarray:
    """For each position, the first later position whose flag is set, or -1."""
    flagged = np.append(np.flatnonzero(flags), -1)
    return flagged[np.searchsorted(flagged[:-1], np.arange(len(flags)), side="right")]


def _merge_weightless(context: _Context, cuts: list[int], head: int | None) -> list[int]:
    """Drop cuts so that no body segment is free of MACs: it joins the previous segment (the next if first)."""
    weight_count = np.concatenate([[0], np.cumsum(context.flops)])
    body_end = head if head is not None else len(context.flow.order) - 1
    ends: list[int] = []
    start = 0
    for cut in [c for c in cuts if c < body_end] + [body_end]:
        weightless = weight_count[cut + 1] == weight_count[start + 1]
        if weightless and ends:
            ends[-1] = cut
        elif weightless and cut != body_end:
            continue  # a weightless first segment: keep its start so it joins the next one
        else:
            ends.append(cut)
        start = cut
    return ends if head is not None else ends[:-1]  # without a head, body_end is the last position, not a cut


def _stage_cuts(context: _Context, blocks: list[int], stem_end: int | None, body_end: int) -> list[int]:
    """Group block segments into stages where the spatial reduction changes.

    A segment whose reduction changes in a weightless tail (pooling after the convolutions, as in VGG or a DenseNet
    transition) closes its stage; any other change (a strided convolution, patch merging) opens a new one."""
    weight_count = np.concatenate([[0], np.cumsum(context.flops)])
    first = stem_end or 0
    bounds = [first] + [b for b in blocks if first < b < body_end] + [body_end]
    cuts = [stem_end] if stem_end is not None else []
    closes_previous = False
    for start, end in zip(bounds[:-1], bounds[1:]):
        change = _reduction_change(context, start, end)
        closes = change is not None and weight_count[end + 1] == weight_count[change + 1]
        if start != first and (closes_previous or (change is not None and not closes)):
            cuts.append(start)
        closes_previous = closes
    return cuts


def _reduction_change(context: _Context, start: int, end: int) -> int | None:
    """The boundary inside (start, end] just before which the reduction changes from its value at ``start``.

    Returns the previous inner boundary (or ``start``): the reduction changes within the span that follows it."""
    reference = context.reduction_after(start) if start else 1
    cuts = context.flow.cuts
    previous = start
    for boundary in cuts[bisect.bisect_right(cuts, start) : bisect.bisect_left(cuts, end)] + [end]:
        reduction = context.reduction_after(boundary)
        if reference is not None and reduction is not None and not math.isclose(reduction, reference):
            return previous
        previous = boundary
    return None


def _named_cuts(context: _Context, names: list[str], head: int | None) -> list[int]:
    """The cuts after the last operation of each named module; none may fall inside the head, which stays one node."""
    flow = context.flow
    last_seen = _last_operations(flow)
    if not names:
        raise DissectionError("no cut named: give at least one module name to cut after (e.g. layer1,layer2)")
    cuts = set()
    previous = None
    for name in names:
        if name not in last_seen:
            raise DissectionError(
                f"cut `{name}`: no operation of that module runs in the model's forward; name a module that is "
                "called (see model.named_modules())"
            )
        if last_seen[name] == len(flow.order) - 1:
            continue  # the model ends there anyway
        cut = flow.canonical_cut(last_seen[name])
        if cut is None:
            usable = _usable_cut_names(flow, last_seen, head)
            hint = f"modules a cut may follow: {', '.join(usable[:12])}" if usable else "no module ends at a legal cut"
            raise DissectionError(
                f"cut after `{name}` is not legal: more than one tensor crosses it (a skip connection or a branch "
                f"spans it); {hint}"
            )
        if head is not None and cut > head:
            start = flow.order[head + 1]
            where = start.meta[SCOPE][-1][0] if start.meta.get(SCOPE) else start.name
            raise DissectionError(
                f"cut after `{name}` falls inside the head, which starts at `{where}` (global pooling or token "
                "selection and what follows) and stays one node; name a module before it"
            )
        if previous is not None and cut <= previous[1]:
            raise DissectionError(
                f"cuts must name modules in the order they run, each once: `{name}` does not end after "
                f"`{previous[0]}`"
            )
        previous = (name, cut)
        cuts.add(cut)
    return sorted(cuts)


def _last_operations(flow: Dataflow) -> dict[str, int]:
    """For every module called in the forward, the position of its last operation (a cut by name goes there)."""
    last_seen: dict[str, int] = {}
    for position, node in enumerate(flow.order):
        for path, _ in node.meta.get(SCOPE, ()):
            last_seen[path] = position
    return last_seen


def _usable_cut_names(flow: Dataflow, last_seen: dict[str, int], head: int | None) -> list[str]:
    """The module names ``cuts=`` accepts, one per legal cut up to the head (the outermost module ending there), in
    forward order."""
    by_cut: dict[int, str] = {}
    for path, position in last_seen.items():
        cut = flow.canonical_cut(position)
        if cut is None or (head is not None and cut > head):
            continue
        if cut not in by_cut or path.count(".") < by_cut[cut].count("."):
            by_cut[cut] = path
    return [by_cut[cut] for cut in sorted(by_cut)]
