"""Assembly (MDA step 5): components from different models, same or different architectures, joined into one
classifier over the union of their classes, without training.

* :func:`assemble` (default ``mode="parallel"``): every component runs as its own branch on the shared input and the
  logits are concatenated, then put in the global class order. Parameters are exactly the sum of the parts. Each
  branch applies its own input normalisation when the components' differ (the assembly then reads [0, 1] pixels).
* ``mode="block-diagonal"`` (:func:`merge_block_diagonal`): the official code's alignment-padding merge, for
  components of one architecture: one network whose layers hold every component's channels, with zero blocks
  between them (the first conv stacks the image kernels, grouped/depthwise convs add up their groups). It computes
  the same logits as the parallel assembly (checked on a random batch when built) but counts the zero blocks as
  parameters: it is there to reproduce the method, not to save anything.
* :func:`scale_head` (parameter scaling): each component's head row ``c`` is divided by the mean winning logit of
  the correctly classified **training** images of class ``c``, so that the components' logits are on one scale before
  the joined argmax. A class with no correctly classified image (or a non-positive mean) keeps its row, with a warning.

Class order: when all components share a label space (the same source dataset, e.g. CIFAR-10 components of two
models), the assembly's logits are the union of their class ids in ascending order, so it is evaluated with
``reassembly eval --model DIR --data 'cifar10[0,1,2,3,4,5]'``; a class in two components is an error. Components from
different datasets keep their classes apart (component after component).

Saved as ``assembly.safetensors`` + ``assembly.json`` (mode, class order, every component's structure record and
scaling ratios; no pickle); :func:`load_assembly` rebuilds it.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import ImageDataset, Preprocess, normalization_of, set_normalization
from ..errors import ReassemblyError
from ..io import atomic_path
from .extract import (
    ChannelEmbed,
    _head_name,
    describe_component,
    load_weights_exactly,
    read_description,
    rebuild_component,
)
from .report import logits_in_batches

FORMAT = "reassembly.lego.assembly/1"
MODES = ("parallel", "block-diagonal")


class Standardize(nn.Module):
    """``(x - mean) / std`` per channel: a branch's own input normalisation, applied to [0, 1] pixels."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Assembly(nn.Module):
    """Components joined into one classifier: ``branches`` run side by side (parallel) or one ``merged`` network
    (block-diagonal); the concatenated logits are reordered by ``order`` into the global class order."""

    def __init__(self, branches: list[nn.Module] | None, merged: nn.Module | None, inputs: list[nn.Module],
                 order: torch.Tensor):
        super().__init__()
        self.branches = nn.ModuleList(branches or [])
        self.merged = merged
        self.inputs = nn.ModuleList(inputs)
        self.register_buffer("order", torch.as_tensor(order, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            out = self.merged(x)
        else:
            out = torch.cat([branch(prepare(x)) for branch, prepare in zip(self.branches, self.inputs)], dim=1)
        return out[:, self.order]


# ------------------------------------------------------------------------------------------------ what components are
def _info(component: nn.Module, index: int) -> dict:
    info = getattr(component, "reassembly_component", None)
    if info is None:
        raise ReassemblyError(f"component {index + 1} is not an extracted MDA component (make it with "
                              "`reassembly disassemble` or reassembly.lego.extract_component)")
    return info


def class_layout(components: list[nn.Module]) -> tuple[list[str], list[list[int]], list[int], list[str]]:
    """(label space of each component, its class ids, the global order of the concatenated logits, the global
    class names as "dataset:id"). One shared label space: class ids ascending, a class in two components is an
    error; several: component after component."""
    spaces, ids = [], []
    for i, component in enumerate(components):
        info = _info(component, i)
        spaces.append(info.get("dataset") or "")
        ids.append([int(c) for c in info["record"]["classes"]])
    flat = [(s, c) for s, cs in zip(spaces, ids) for c in cs]
    if len(set(spaces)) == 1:
        owner = {}
        for i, cs in enumerate(ids):
            for c in cs:
                if c in owner:
                    where = f" of {spaces[0]}" if spaces[0] else ""
                    raise ReassemblyError(f"class {c}{where} is in component {owner[c] + 1} and component {i + 1}; "
                                          "an assembly needs each class in one component only")
                owner[c] = i
        order = sorted(range(len(flat)), key=lambda k: flat[k][1])
    else:
        order = list(range(len(flat)))
    names = [f"{flat[k][0]}:{flat[k][1]}" if flat[k][0] else str(flat[k][1]) for k in order]
    return spaces, ids, order, names


def _check_inputs(components: list[nn.Module]) -> list[int]:
    sizes = [list(_info(c, i)["record"]["input_size"]) for i, c in enumerate(components)]
    if any(s != sizes[0] for s in sizes):
        listed = ", ".join(f"component {i + 1}: {'x'.join(map(str, s))}" for i, s in enumerate(sizes))
        raise ReassemblyError(f"the components take different input sizes ({listed}); an assembly reads one image "
                              "for all of them")
    return sizes[0]


# ---------------------------------------------------------------------------------------------------- assembling
def assemble(components: list[nn.Module], mode: str = "parallel", *, verify: bool = True) -> Assembly:
    """One classifier over the union of the components' classes (see the module docstring). The components are
    copied, not modified."""
    if mode not in MODES:
        raise ReassemblyError(f"assembly mode must be one of {', '.join(MODES)}, not {mode!r}")
    if len(components) < 2:
        raise ReassemblyError(f"an assembly needs at least two components, got {len(components)}")
    size = _check_inputs(components)
    spaces, ids, order, names = class_layout(components)
    norms = [normalization_of(c) for c in components]
    parts = [copy.deepcopy(c).eval() for c in components]
    if mode == "block-diagonal":
        merged = merge_block_diagonal(parts, verify=verify)
        assembly = Assembly(None, merged, [], torch.tensor(order))
        set_normalization(assembly, *norms[0])
    else:
        shared = all(n == norms[0] for n in norms)
        inputs = [nn.Identity() if shared else Standardize(*n) for n in norms]
        assembly = Assembly(parts, None, inputs, torch.tensor(order))
        set_normalization(assembly, *(norms[0] if shared else ((0.0,) * size[0], (1.0,) * size[0])))
    assembly.reassembly_assembly = {
        "mode": mode, "input_size": size, "label_spaces": spaces, "classes": names,
        "components": [describe_component(c) for c in components],
    }
    assembly.reassembly_input_size = list(size)
    assembly.reassembly_classes = sorted(c for cs in ids for c in cs) if len(set(spaces)) == 1 else None
    assembly.reassembly_dataset = spaces[0] if len(set(spaces)) == 1 else None
    assembly.reassembly_name = f"assembly of {len(components)} components"
    return assembly.eval()


# ------------------------------------------------------------------------------------------- block-diagonal merging
def _layer_inputs(model: nn.Module, size) -> tuple[dict[str, int], set[str]]:
    """Per module, the channel count of its input; and the layers that read the image itself."""
    widths, image_readers, handles = {}, set(), []
    x = torch.zeros(1, *size, device=next(model.parameters()).device)

    def hook(name):
        def record(module, args):
            if args and isinstance(args[0], torch.Tensor):
                widths[name] = args[0].shape[1]
                if args[0] is x:
                    image_readers.add(name)
        return record

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return widths, image_readers


def _block_diagonal(weights: list[torch.Tensor]) -> torch.Tensor:
    out = weights[0].new_zeros(sum(w.shape[0] for w in weights), sum(w.shape[1] for w in weights),
                               *weights[0].shape[2:])
    r = c = 0
    for w in weights:
        out[r:r + w.shape[0], c:c + w.shape[1]] = w
        r, c = r + w.shape[0], c + w.shape[1]
    return out


def _cat(tensors) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors])


def _merge_conv(name: str, parts: list[nn.Conv2d], reads_image: bool) -> nn.Conv2d:
    first = parts[0]
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        if any(getattr(p, attr) != getattr(first, attr) for p in parts):
            raise ReassemblyError(f"cannot merge layer {name}: the components' {attr} differ")
    if len({p.bias is None for p in parts}) > 1:
        raise ReassemblyError(f"cannot merge layer {name}: some components have a bias, others not")
    bias = _cat([p.bias for p in parts])
    if reads_image:
        if any(p.in_channels != first.in_channels or p.groups != first.groups for p in parts):
            raise ReassemblyError(f"cannot merge layer {name}: the components read the image differently")
        weight, groups, in_channels = torch.cat([p.weight.detach() for p in parts]), first.groups, first.in_channels
    elif all(p.groups == 1 for p in parts):
        weight, groups = _block_diagonal([p.weight.detach() for p in parts]), 1
        in_channels = sum(p.in_channels for p in parts)
    else:
        per_in = {p.in_channels // p.groups for p in parts}
        per_out = {p.out_channels // p.groups for p in parts}
        if len(per_in) != 1 or len(per_out) != 1:
            raise ReassemblyError(f"cannot merge the grouped layer {name}: its groups have different widths in the "
                                  "components (use the parallel assembly)")
        weight, groups = torch.cat([p.weight.detach() for p in parts]), sum(p.groups for p in parts)
        in_channels = sum(p.in_channels for p in parts)
    conv = nn.Conv2d(in_channels, weight.shape[0], first.kernel_size, first.stride, first.padding, first.dilation,
                     groups, bias is not None, first.padding_mode).to(weight)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _merge_linear(name: str, parts: list[nn.Linear]) -> nn.Linear:
    if any((p.bias is None) != (parts[0].bias is None) for p in parts):
        raise ReassemblyError(f"cannot merge layer {name}: some components have a bias, others not")
    weight, bias = _block_diagonal([p.weight.detach() for p in parts]), _cat([p.bias for p in parts])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None).to(weight)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _merge_norm(name: str, parts: list[nn.modules.batchnorm._BatchNorm]) -> nn.Module:
    merged = copy.deepcopy(parts[0])
    merged.num_features = sum(p.num_features for p in parts)
    for key in ("weight", "bias"):
        if getattr(parts[0], key) is not None:
            setattr(merged, key, nn.Parameter(_cat([getattr(p, key) for p in parts])))
    for key in ("running_mean", "running_var"):
        if getattr(parts[0], key) is not None:
            setattr(merged, key, _cat([getattr(p, key) for p in parts]))
    return merged


def _merge_embed(parts: list[ChannelEmbed], widths: list[int]) -> ChannelEmbed:
    src, dst, into, out = [], [], 0, 0
    for part, width in zip(parts, widths):
        src.append(part.src + into)
        dst.append(part.dst + out)
        into, out = into + width, out + part.out_channels
    return ChannelEmbed(out, torch.cat(src), torch.cat(dst), parts[0].stride)


def merge_block_diagonal(components: list[nn.Module], *, verify: bool = True, atol: float = 1e-5) -> nn.Module:
    """One network of the components' shared architecture holding all their channels (alignment padding, see the
    module docstring); its logits are the components' logits concatenated in the given order. ``verify`` checks
    that on a random batch (relative to the logits' scale, ``atol``)."""
    size = _check_inputs(components)
    if len({(tuple(m), tuple(s)) for m, s in (normalization_of(c) for c in components)}) != 1:
        raise ReassemblyError("the components normalise their input differently; the block-diagonal merge shares one "
                              "first layer, so use the parallel assembly")
    layouts = [[(n, type(m).__module__, type(m).__qualname__) for n, m in c.named_modules()] for c in components]
    for i, layout in enumerate(layouts[1:], 2):
        if layout != layouts[0]:
            diff = next(((a, b) for a, b in zip(layouts[0], layout) if a != b), None)
            where = f" (first difference: {diff[0][0] or 'the model'} is {diff[0][2]} in component 1, " \
                    f"{diff[1][0] or 'the model'} is {diff[1][2]} in component {i})" if diff else ""
            raise ReassemblyError(f"components 1 and {i} are not the same architecture{where}; the block-diagonal "
                                  "merge needs one architecture (use the parallel assembly)")
    inputs = [_layer_inputs(c, size) for c in components]
    readers = inputs[0][1]
    merged = copy.deepcopy(components[0]).eval()
    tables = [dict(c.named_modules()) for c in components]
    for name, module in list(merged.named_modules()):
        if not name:
            if module._parameters or any(b is not None for b in module._buffers.values()):
                raise ReassemblyError("cannot merge: the model holds parameters of its own outside its layers")
            continue
        parts = [t[name] for t in tables]
        if isinstance(module, nn.Conv2d):
            new = _merge_conv(name, parts, name in readers)
        elif isinstance(module, nn.Linear):
            new = _merge_linear(name, parts)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            new = _merge_norm(name, parts)
        elif isinstance(module, ChannelEmbed):
            new = _merge_embed(parts, [widths[name] for widths, _ in inputs])
        elif module._parameters or any(b is not None for b in module._buffers.values()):
            raise ReassemblyError(f"cannot merge layer {name} ({type(module).__name__}): only conv, linear, batch "
                                  "norm and parameter-free layers are merged (use the parallel assembly)")
        else:
            continue
        parent = merged.get_submodule(name.rpartition(".")[0]) if "." in name else merged
        setattr(parent, name.rpartition(".")[2], new)
    if verify:
        x = torch.randn(4, *size, generator=torch.Generator().manual_seed(0)).to(next(merged.parameters()).device)
        with torch.no_grad():
            want = torch.cat([c(x) for c in components], dim=1)
            try:
                got = merged(x)
            except RuntimeError as error:
                raise ReassemblyError(f"the block-diagonal merge does not run ({str(error).splitlines()[0]}); this "
                                      "architecture's channels are not block-structured (use the parallel "
                                      "assembly)") from None
        scale = want.abs().max().clamp(min=1.0)
        if got.shape != want.shape or (got - want).abs().max() > atol * scale:
            raise ReassemblyError("the block-diagonal merge does not compute the components' logits (an operation "
                                  "mixes their channels); use the parallel assembly")
    return merged


# ---------------------------------------------------------------------------------------------------- scaling
@torch.no_grad()
def scale_head(component: nn.Module, dataset: ImageDataset, *, per_class: int | None = 200, seed: int = 0,
               batch_size: int = 500) -> list[float]:
    """Parameter scaling of a component's head, in place, from **training** images (see the module docstring).

    ``dataset`` holds images with the component's source labels (the full label space it was disassembled from);
    up to ``per_class`` images of each of its classes are drawn (seeded; None: all). Returns the ratios, one per
    logit, and records them on the component."""
    info = _info(component, 0)
    classes = [int(c) for c in info["record"]["classes"]]
    labels = dataset.labels.numpy()
    if max(classes) >= dataset.num_classes:
        raise ReassemblyError(f"{dataset.name} has {dataset.num_classes} classes but the component is for classes "
                              f"{classes}; scale it with the data it was disassembled from")
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    rows = np.sort(np.concatenate(rows))
    if len(rows) == 0:
        raise ReassemblyError(f"{dataset.name} has no image of classes {classes} to scale the component with")
    x = Preprocess(*normalization_of(component))(dataset.images[torch.from_numpy(rows)])
    local = torch.tensor([classes.index(int(c)) for c in labels[rows]])
    logits = logits_in_batches(component, x, batch_size)
    win, predicted = logits.max(1)
    ratios = []
    for k, c in enumerate(classes):
        hit = (local == k) & (predicted == k)
        mean = win[hit].double().mean().item() if hit.any() else None
        if mean is None or mean <= 0:
            why = "no correctly classified image" if mean is None else f"a mean winning logit of {mean:.3g} (<= 0)"
            warnings.warn(f"class {c}: {why} among {int((local == k).sum())} training images; its head row is not "
                          "scaled", stacklevel=2)
            ratios.append(1.0)
        else:
            ratios.append(1.0 / mean)
    head = component.get_submodule(_head_name_of(component))
    r = torch.tensor(ratios, dtype=head.weight.dtype, device=head.weight.device)
    head.weight.mul_(r[:, None])
    if head.bias is not None:
        head.bias.mul_(r)
    info["scaling"] = {"ratios": ratios, "data": dataset.name, "images": len(rows), "per_class": per_class,
                       "seed": seed}
    return ratios


def _head_name_of(component: nn.Module) -> str:
    from .locate import ComponentMasks

    return _head_name(ComponentMasks.from_dict(_info(component, 0)["record"]))


# ------------------------------------------------------------------------------------------------ saving/loading
def save_assembly(assembly: Assembly, directory) -> Path:
    """Write ``assembly.safetensors`` + ``assembly.json`` into ``directory`` (no pickle)."""
    from safetensors.torch import save_file

    info = getattr(assembly, "reassembly_assembly", None)
    if info is None:
        raise ReassemblyError("not an assembly (made by reassembly.lego.assemble)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in assembly.state_dict().items()}
    meta = {"format": FORMAT, **info, "normalization": assembly.input_normalization,
            "shapes": {k: list(v.shape) for k, v in state.items()}}
    with atomic_path(directory / "assembly.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    with atomic_path(directory / "assembly.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return directory


def load_assembly(directory) -> Assembly:
    """Rebuild an assembly saved by :func:`save_assembly`: every component from its record, joined the same way,
    then the saved weights (strictly: every tensor and shape must match)."""
    directory = Path(directory)
    meta = read_description(directory / "assembly.json", FORMAT, "assembly")
    try:
        components = [rebuild_component(info) for info in meta["components"]]
    except (KeyError, TypeError) as error:
        raise ReassemblyError(f"{directory / 'assembly.json'} is malformed ({type(error).__name__}: {error})") \
            from None
    assembly = assemble(components, meta["mode"], verify=False)
    load_weights_exactly(assembly, directory / "assembly.safetensors", "assembly")
    set_normalization(assembly, meta["normalization"]["mean"], meta["normalization"]["std"])
    assembly.reassembly_assembly["components"] = meta["components"]  # with their scaling records
    return assembly.eval()
