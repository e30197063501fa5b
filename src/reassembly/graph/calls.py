"""A chain graph recorded from module calls, for models torch.fx cannot trace.

One forward pass with hooks records the calls of every module on the way to the named cut points. A module is
replaced by the sequence of its children's calls when each child reads exactly what the previous one returned (or a
reshaped view of it, as in ``torch.flatten`` before a classifier). The result is a graph of ``call_module`` nodes
that the rest of the dissection treats like a traced one; recomposition is checked on the example input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import DissectionError, first_line
from .trace import SCOPE, TracedModel


@dataclass
class _Call:
    path: str
    index: int
    args: tuple
    kwargs: dict
    output: object = None
    children: list[_Call] = field(default_factory=list)


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts))]


def _record(model: nn.Module, example: torch.Tensor, expanded: set[str], model_name: str) -> _Call:
    """Run ``model`` once, recording the calls of the modules in ``expanded`` and of their children."""
    watched = set(expanded)
    for path in expanded:
        watched.update(f"{path}.{name}".lstrip(".") for name, _ in model.get_submodule(path).named_children())
    counts: dict[str, int] = {}
    stack: list[_Call] = [_Call("<root>", 0, (), {})]
    handles = []

    def enter(path):
        def hook(module, args, kwargs):
            stack.append(_Call(path, counts.get(path, 0), args, kwargs))
            counts[path] = counts.get(path, 0) + 1

        return hook

    def leave(path):
        def hook(module, args, kwargs, output):
            call = stack.pop()
            call.output = output
            stack[-1].children.append(call)

        return hook

    try:
        for path in watched:
            module = model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(enter(path), with_kwargs=True))
            handles.append(module.register_forward_hook(leave(path), with_kwargs=True))
        with torch.no_grad():
            model(example)
    except Exception as error:
        size = tuple(example.shape[1:])
        raise DissectionError(f"{model_name} fails on an input of size {size}: {first_line(error)}") from error
    finally:
        for handle in handles:
            handle.remove()
    (root_call,) = stack[0].children
    return root_call


def _is_view_of(value, source) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and isinstance(source, torch.Tensor)
        and value.numel() == source.numel()
        and value.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        and torch.equal(source.reshape(value.shape), value)
    )


class _Builder:
    """Appends one ``call_module`` node per replayed call, with reshapes where the model flattens between calls."""

    def __init__(self, model_name: str, expanded: set[str]):
        self.graph = fx.Graph()
        self.model_name = model_name
        self.expanded = expanded
        self.scope: list[tuple[str, int]] = []

    def _add(self, op: str, target, args: tuple) -> fx.Node:
        node = self.graph.create_node(op, target, args)
        node.meta[SCOPE] = tuple(self.scope)
        return node

    def connect(self, value: torch.Tensor, node: fx.Node, source: torch.Tensor, between: str) -> fx.Node:
        """The graph node holding ``value``, given that ``node`` holds ``source``."""
        if value is source:
            return node
        if _is_view_of(value, source):
            batch = self._add("call_method", "size", (node, 0))
            return self._add("call_method", "reshape", (node, batch, *value.shape[1:]))
        raise DissectionError(
            f"{self.model_name}: the forward does more {between} than call them in order (the input of one is not "
            "the output of the previous, or a reshape of it), so a chain of module calls cannot reproduce it; cut at "
            "modules whose calls follow one another directly"
        )

    def replay(self, call: _Call, node: fx.Node) -> fx.Node:
        """Add ``call`` reading ``node`` (expanded into its children if it leads to a cut); return its output."""
        label = f"`{call.path}`" if call.path else "the top-level forward"
        if call.kwargs or len(call.args) != 1 or not isinstance(call.args[0], torch.Tensor):
            raise DissectionError(
                f"{self.model_name}: {label} is called with other than a single tensor, so it cannot be replayed as a "
                "chain of module calls"
            )
        if call.path and call.path not in self.expanded:
            self.scope.append((call.path, call.index))
            output = self._add("call_module", call.path, (node,))
            self.scope.pop()
            return output
        if call.path:
            self.scope.append((call.path, call.index))
        value, previous = call.args[0], f"the start of {label}"
        for child in call.children:
            argument = child.args[0] if child.args else None
            node = self.connect(argument, node, value, f"between {previous} and `{child.path}`")
            node = self.replay(child, node)
            value, previous = child.output, f"`{child.path}`"
        node = self.connect(call.output, node, value, f"between {previous} and the end of {label}")
        if call.path:
            self.scope.pop()
        return node


def record_calls(model: nn.Module, example: torch.Tensor, cut_names: list[str], model_name: str) -> TracedModel:
    """A graph of the module calls that lead to ``cut_names`` (existing module paths), recorded on ``example``."""
    expanded = {ancestor for name in cut_names for ancestor in _ancestors(name)}
    root_call = _record(model, example, expanded, model_name)
    builder = _Builder(model_name, expanded)
    entry = builder.graph.placeholder("x")
    entry.meta[SCOPE] = ()
    builder.graph.output(builder.replay(root_call, entry))
    return TracedModel(model, builder.graph, "module-calls")
