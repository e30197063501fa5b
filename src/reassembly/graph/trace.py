"""Symbolic tracing that remembers, for every graph node, which module calls it was created inside.

The module-call scope is what turns a flat dataflow graph back into names a person recognises (``layer1.0``,
``blocks.3``) and what tells block boundaries apart from cuts inside a block. A trace failure is pinned on the
innermost module whose ``forward`` could not be traced: that module's class is then kept whole, or, when the
top-level forward itself fails, the error names where the data-dependent code lives. A second trace in training mode
finds the code that reads ``self.training``, so that the blocks can follow the training mode.
"""

from __future__ import annotations

import inspect
import linecache
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import DissectionError, UntraceableModelError, first_line

SCOPE = "reassembly_scope"
"""``node.meta`` key: tuple of ``(module_path, call_index)`` for the module calls enclosing the node, outermost first.
For a ``call_module`` node the last entry is the called (leaf) module itself."""

SOURCE = "reassembly_source"
"""``node.meta`` key: ``file:line: code`` of the model code that made the node, for error messages (or None)."""

Call = tuple[str, int]
_NOT_MODEL_CODE = (os.path.dirname(torch.__file__), __file__)


@dataclass
class TracedModel:
    """A traced graph whose nodes carry module-call scopes.

    ``root`` owns (by reference) every submodule, parameter and constant the graph uses; ``opaque`` lists the
    modules kept whole because their forward could not be traced; ``frozen`` those whose code runs as in eval mode
    even in training mode (see :func:`_follow_training_mode`)."""

    root: nn.Module
    graph: fx.Graph
    method: str  # "fx" for symbolic tracing, "module-calls" for the hook-recorded chain of module calls
    opaque: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()  # modules ("" for the top level) whose training-mode code the graph does not follow


class _ScopedTracer(fx.Tracer):
    """An fx tracer that records module-call scopes and tags trace failures with the innermost failing module."""

    def __init__(self, extra_leaves: tuple[type, ...], autowrap_functions: tuple):
        super().__init__(autowrap_functions=autowrap_functions, param_shapes_constant=True)
        self._extra_leaves = extra_leaves
        self._stack: list[Call] = []
        self._calls: Counter[str] = Counter()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or isinstance(m, self._extra_leaves)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)  # raises for a module created inside forward: the enclosing call is blamed
        self._stack.append((path, self._calls[path]))
        self._calls[path] += 1
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, "reassembly_module_path"):
                error.reassembly_module_path = path
            raise
        finally:
            self._stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta[SCOPE] = tuple(self._stack)
        node.meta[SOURCE] = _model_source_line()
        return node


def _model_source_line() -> str | None:
    """``file:line: code`` of the innermost caller outside torch and this module: the model code being traced.
    (Much cheaper than fx's own ``record_stack_traces``, which formats the whole stack for every node.)"""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_NOT_MODEL_CODE):
        frame = frame.f_back
    if frame is None:
        return None
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: {code}"


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's own lists of modules and functions that fx must not trace into (only if timm is already loaded)."""
    layers = sys.modules.get("timm.layers")
    if layers is None:
        return (), ()
    modules = tuple(getattr(layers, "get_notrace_modules", lambda: ())())
    functions = tuple(getattr(layers, "get_notrace_functions", lambda: ())())
    return modules, functions


def _specialise_extra_arguments(model: nn.Module, model_name: str) -> dict:
    """Bind every forward argument after the input to its default, so the graph has exactly one input."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    if not parameters or parameters[0].kind in (parameters[0].VAR_POSITIONAL, parameters[0].VAR_KEYWORD):
        raise DissectionError(
            f"{model_name}: forward takes no single input tensor (its signature is "
            f"{inspect.signature(model.forward)}); dissection feeds one tensor, so wrap the model in a module whose "
            "forward(x) calls it"
        )
    concrete = {}
    for parameter in parameters[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            raise DissectionError(
                f"{model_name}: forward needs argument `{parameter.name}` besides the input; dissection "
                "feeds a single tensor, so wrap the model in a module whose forward takes only that tensor"
            )
        concrete[parameter.name] = parameter.default
    return concrete


def _drop_specialisation_guards(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for specialised arguments, and the assertions that guard them."""
    extra = [node for node in graph.nodes if node.op == "placeholder"][1:]
    doomed: list[fx.Node] = []
    frontier = list(extra)
    while frontier:
        node = frontier.pop()
        if node in doomed:
            continue
        doomed.append(node)
        frontier.extend(node.users)
    doomed_set = set(doomed)
    for node in doomed:
        if any(user not in doomed_set for user in node.users):
            raise DissectionError(f"specialised forward argument feeds the computation through `{node.name}`")
    position = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted(doomed, key=position.__getitem__, reverse=True):
        graph.erase_node(node)


def trace(model: nn.Module, model_name: str, strict: bool = False) -> TracedModel:
    """Trace ``model`` with torch.fx.

    When the forward of a submodule cannot be traced (Python control flow on tensor values or shapes), modules of
    its class are kept whole, as single opaque operations, and tracing is retried; with ``strict`` the first failure
    raises instead. Raises :class:`UntraceableModelError` naming the innermost failing module when the top-level
    forward itself cannot be traced, or under ``strict``. The graph is that of eval mode, with training flags read at
    run time (see :func:`_follow_training_mode`)."""
    leaves, functions = _timm_notrace()
    concrete = _specialise_extra_arguments(model, model_name)
    opaque_types: tuple[type, ...] = ()
    while True:
        tracer = _ScopedTracer(leaves + opaque_types, functions)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            break
        except Exception as error:
            path = getattr(error, "reassembly_module_path", "")
            if strict or not path or isinstance(model.get_submodule(path), opaque_types):
                raise _untraceable(model, model_name, error) from error
            opaque_types += (type(model.get_submodule(path)),)
    if concrete:
        _drop_specialisation_guards(graph)
    root = fx.GraphModule(tracer.root, graph)  # holds references to the model's own modules and parameters
    opaque = tuple(
        node.target
        for node in graph.nodes
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), opaque_types)
    )
    frozen = _follow_training_mode(model, root, _ScopedTracer(leaves + opaque_types, functions), concrete)
    return TracedModel(root, graph, "fx", tuple(dict.fromkeys(opaque)), frozen)


class TrainingFlag(nn.Module):
    """Returns, when the graph runs, the training flag of ``owner``: the module whose forward passed ``self.training``
    to the call that reads this. The owner is held, not registered, so its parameters are not counted twice."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", owner)

    def forward(self) -> bool:
        return self.owner.training


def _follow_training_mode(
    model: nn.Module, root: fx.GraphModule, tracer: _ScopedTracer, concrete: dict
) -> tuple[str, ...]:
    """Make traced code that reads ``self.training`` follow the flag at run time; return where it cannot.

    Tracing runs in eval mode, so ``F.dropout(x, p, self.training)`` is recorded with ``False`` and a drop path
    (``if not self.training: return x``) leaves no operation at all. The model is traced once more in training mode
    and the two graphs are compared call by call: an argument that is ``False`` in one and ``True`` in the other is the
    training flag, and now reads the calling module's flag through a :class:`TrainingFlag`. Any other difference stays
    frozen to eval behaviour: the modules concerned are returned ("" for the top-level forward)."""
    modes = {module: module.training for module in model.modules()}
    model.train()
    try:
        train_graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as error:  # the training-mode forward differs so much that it cannot be traced
        return (getattr(error, "reassembly_module_path", ""),)
    finally:
        for module, training in modes.items():
            module.training = training
    if concrete:
        _drop_specialisation_guards(train_graph)
    ours, theirs = _by_call(root.graph), _by_call(train_graph)
    frozen: dict[str, None] = {}
    for scope in dict.fromkeys([*ours, *theirs]):
        nodes, others = ours.get(scope, []), theirs.get(scope, [])
        flags = [_flag_arguments(node, other) for node, other in zip(nodes, others)]
        if [(n.op, n.target) for n in nodes] != [(n.op, n.target) for n in others] or None in flags:
            frozen[scope[-1][0] if scope else ""] = None
            continue
        for node, keys in zip(nodes, flags):
            for key in keys:
                _read_training_flag(model, root, node, key)
    root.recompile()
    return tuple(frozen)


def _by_call(graph: fx.Graph) -> dict[tuple[Call, ...], list[fx.Node]]:
    """The graph's operations grouped by the module calls enclosing them."""
    calls: dict[tuple[Call, ...], list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            calls.setdefault(node.meta[SCOPE], []).append(node)
    return calls


def _flag_arguments(node: fx.Node, other: fx.Node) -> list[int | str] | None:
    """Positions and keywords where ``node`` passes ``False`` and ``other`` passes ``True`` (a training flag); None
    when the two calls differ in any other constant."""
    if len(node.args) != len(other.args) or node.kwargs.keys() != other.kwargs.keys():
        return None
    pairs = [*zip(range(len(node.args)), node.args, other.args)]
    pairs += [(key, node.kwargs[key], other.kwargs[key]) for key in node.kwargs]
    flags: list[int | str] = []
    for key, ours, theirs in pairs:
        if ours is False and theirs is True:
            flags.append(key)
        elif fx.node.map_arg(ours, lambda _: None) != fx.node.map_arg(theirs, lambda _: None):
            return None
    return flags


def _read_training_flag(model: nn.Module, root: fx.GraphModule, node: fx.Node, key: int | str) -> None:
    """Make argument ``key`` of ``node`` the training flag, read when the graph runs, of the module that called it."""
    calls = node.meta[SCOPE][:-1] if node.op == "call_module" else node.meta[SCOPE]
    owner = calls[-1][0] if calls else ""
    name = f"reassembly_training_of_{owner.replace('.', '_') or 'model'}"
    if not hasattr(root, name):
        root.add_module(name, TrainingFlag(model.get_submodule(owner)))
    with root.graph.inserting_before(node):
        flag = root.graph.call_module(name)
    flag.meta[SCOPE] = calls
    if isinstance(key, int):
        node.update_arg(key, flag)
    else:
        node.update_kwarg(key, flag)


def _untraceable(model: nn.Module, model_name: str, error: Exception) -> UntraceableModelError:
    path = getattr(error, "reassembly_module_path", "")
    where = f"module `{path}` ({type(model.get_submodule(path)).__name__})" if path else "the top-level forward"
    reason = first_line(error)
    example = ", ".join(f'"{name}"' for name, _ in list(model.named_children())[:3]) or '"features"'
    return UntraceableModelError(
        f"torch.fx cannot trace {where} of {model_name}: {reason}. Pass the cut points by module name instead, "
        f"e.g. dissect(model, cuts=[{example}]); the chain is then built from the recorded module calls",
        path,
    )
