"""Count parameters and MACs (multiply-accumulates).

MACs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions, matrix products and
attention; it reports FLOPs = 2 x MACs, so every figure here is halved and called MACs. Batch norm,
activations, pooling and additions are not counted (the convention behind MobileNetV2's 300M "MAdds").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# PyTorch's counter knows the GPU attention kernels but not the CPU one; attention is matmul work, so count it.
def _cpu_attention_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def mac_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention; divide its FLOPs by 2 for MACs."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a shared tensor is counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _example_input(model: nn.Module, input_size) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(1, *input_size, device=device, dtype=dtype)


def _counted_forward(model: nn.Module, input_size) -> FlopCounterMode:
    """One eval-mode forward pass on a zero image under a MAC counter; every module's mode is restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), mac_counter() as counter:
            model(_example_input(model, input_size))
    finally:
        for module, training in modes.items():
            module.training = training
    return counter


def count_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """MACs of one forward pass on one image of shape ``input_size`` (C, H, W)."""
    return _counted_forward(model, input_size).get_total_flops() // 2


@dataclass
class LayerRow:
    """One leaf module of a model: what it is, what it outputs, what it holds and costs."""

    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int


def layer_table(model: nn.Module, input_size=(3, 32, 32), max_depth: int | None = None) -> list[LayerRow]:
    """A row per module that holds parameters or does arithmetic of its own, in call order, for one image.

    A module's row counts only what its children do not (the attention product of an attention module, a
    class token), so the rows add up to the whole model. ``max_depth`` folds deeper modules into their
    ancestor at that depth (1 = top-level children).
    """
    names = {module: name for name, module in model.named_modules() if name}
    out_shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []

    def record(module, _inputs, output):
        name = names[module]
        if name not in out_shapes:
            order.append(name)
        out_shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()

    handles = [m.register_forward_hook(record) for m in names]
    try:
        counter = _counted_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    root = type(model).__name__ + "."
    total_macs = {k[len(root):]: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items() if k.startswith(root)}
    by_name = {name: module for module, name in names.items()}

    def own(name: str) -> tuple[int, int]:
        module = by_name[name]
        children = [f"{name}.{child}" for child, _ in module.named_children()]
        macs = total_macs.get(name, 0) - sum(total_macs.get(c, 0) for c in children)
        params = sum(p.numel() for p in module.parameters(recurse=False))
        return params, macs

    rows = []
    for name in order:
        depth = name.count(".") + 1
        if max_depth is not None and depth > max_depth:
            continue
        if max_depth is not None and depth == max_depth:
            params, macs = count_params(by_name[name]), total_macs.get(name, 0)
        else:
            params, macs = own(name)
            if not (params or macs or not list(by_name[name].children())):
                continue
        rows.append(LayerRow(name, type(by_name[name]).__name__, out_shapes[name], params, macs))
    return rows
