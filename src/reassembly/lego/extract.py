"""Physical extraction of an MDA component (step 4): cut the located channels out into a smaller plain model.

Reads a trained model and its :class:`~reassembly.lego.locate.ComponentMasks`; returns a copy in which every
conv/linear/batch-norm layer has only the channels the record keeps, and whose head outputs exactly the record's
classes, in the record's order. The original model is not modified.

How: Torch-Pruning's ``DependencyGraph`` is built on a copy of the model and every dependency group (the coupled
channels of producers, their batch norms, consumers, residual additions, concatenations, depthwise convs) is pruned
**once**, from the union of the masks of its members in the original channel numbering: a channel survives if any
conv/linear member of the group keeps it. ``locate`` has already made coupled channels agree, so the union normally
equals each member's mask. Afterwards every layer is checked against the record (shape, and that its weight is
exactly the original weight at the kept rows/columns); a layer Torch-Pruning could not prune the way the record
says is a :class:`~reassembly.errors.ReassemblyError` naming it, never a silently different model.

Option-A shortcuts (``PadShortcut`` of the CIFAR ResNets: subsample, then zero-pad channels) are invisible to
Torch-Pruning (it would treat the padding as an element-wise op and mis-align the channels). Before the graph is
built each one is replaced by an equivalent fixed 1x1 strided conv whose weight is the 0/1 embedding of the input
channels into the padded ones; Torch-Pruning then couples both sides correctly, and after pruning the conv is turned
back into a parameter-free :class:`ChannelEmbed` (kept input channel -> its position among the kept outputs, zeros
elsewhere).

Saving does not pickle: ``save_component`` writes ``component.safetensors`` (the pruned state dict) and
``component.json`` (architecture, constructor kwargs, the whole mask record, the pruned shapes, classes,
normalisation); ``load_component`` rebuilds the architecture, prunes it the same way from the stored masks and loads
the weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ReassemblyError
from ..io import atomic_path
from .locate import ComponentMasks

FORMAT = "reassembly.lego.component/1"


class ChannelEmbed(nn.Module):
    """Parameter-free channel embedding: ``out[:, dst[i]] = x[:, src[i], ::stride, ::stride]``, zeros elsewhere.

    What an option-A (zero-padding) shortcut becomes once channels on both of its sides are pruned."""

    def __init__(self, out_channels: int, src: torch.Tensor, dst: torch.Tensor, stride: int):
        super().__init__()
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.register_buffer("src", torch.as_tensor(src, dtype=torch.long))
        self.register_buffer("dst", torch.as_tensor(dst, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])
        out[:, self.dst] = x[:, self.src]
        return out

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, kept={len(self.src)}, stride={self.stride}"


class _PadConv(nn.Conv2d):
    """A zero-padding shortcut written as a fixed 1x1 strided conv, so that Torch-Pruning can follow its channels."""


def _pad_shortcuts_to_convs(model: nn.Module) -> list[str]:
    from ..zoo.models.cifar_resnet import PadShortcut

    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, PadShortcut):
            continue
        low, high = module.pad
        if low < 0 or high < 0:
            raise ReassemblyError(f"cannot extract through the shortcut {name}: it crops channels ({module.pad})")
        width = _input_width(model, name)
        conv = _PadConv(width, width + low + high, 1, module.stride, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[torch.arange(width) + low, torch.arange(width), 0, 0] = 1
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], conv)
        replaced.append(name)
    return replaced


def _input_width(model: nn.Module, name: str) -> int:
    """The channel count a PadShortcut receives: its block's first conv reads the same tensor."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    conv1 = getattr(parent, "conv1", None)
    if not isinstance(conv1, nn.Conv2d):
        raise ReassemblyError(f"cannot extract through the zero-padding shortcut {name}: its input width is unknown "
                              "(no conv1 beside it)")
    return conv1.in_channels


def _refuse_channel_padding(model: nn.Module) -> None:
    """Channel zero-padding other than the zoo's PadShortcut: Torch-Pruning would mis-align it; refuse by name."""
    import torch.nn.functional as F

    from ..graph.trace import trace

    try:
        graph = trace(model, "model").graph
    except Exception:  # noqa: BLE001 - locate traced this model already; the post-check still guards
        return
    for node in graph.nodes:
        if node.op == "call_function" and node.target is F.pad:
            pad = list(node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ()))
            if len(pad) >= 6 and any(pad[4:6]):
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                where = stack[-1][0] if stack else node.name
                source = node.meta.get("reassembly_source")
                raise ReassemblyError(f"cannot extract through the channel padding in {where} ({pad}"
                                      f"{', at ' + source if source else ''}): Torch-Pruning does not see it; only "
                                      "the zoo's PadShortcut is converted")


def _convs_back_to_embeds(model: nn.Module, names: list[str]) -> None:
    for name in names:
        conv = model.get_submodule(name)
        w = conv.weight.detach()[:, :, 0, 0]
        dst, src = torch.nonzero(w, as_tuple=True)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], ChannelEmbed(conv.out_channels, src, dst, conv.stride[0]))


def _prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, _PadConv)


def extract_component(model: nn.Module, record: ComponentMasks, example_input: torch.Tensor | None = None, *,
                      architecture: str | None = None, arch_kwargs: dict | None = None,
                      check_weights: bool = True, dataset: str | None = None) -> nn.Module:
    """A smaller plain copy of ``model`` with exactly the channels ``record`` keeps (see the module docstring).

    ``example_input`` defaults to one random input of the record's ``input_size``. ``architecture``/``arch_kwargs``
    (how to rebuild the model with :func:`reassembly.create_model`, stored by :func:`save_component`) default to the
    zoo name and kwargs the model was created with. ``dataset`` names the label space the record's class ids refer
    to (e.g. "cifar10"); assembly uses it to tell classes of different datasets apart."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ReassemblyError("extracting a component needs Torch-Pruning: pip install 'reassembly[lego]'") from None
    if example_input is None:
        example_input = torch.randn(1, *record.input_size)
    component = copy.deepcopy(model).eval()
    device = next(component.parameters()).device
    example_input = example_input.to(device)
    modules = dict(component.named_modules())
    missing = [n for n in record.layers if not _prunable(modules.get(n))]
    if missing:
        raise ReassemblyError(f"layer {missing[0]} of the mask record is not a conv/linear layer of this model")
    unrecorded = [n for n, m in modules.items() if _prunable(m) and n not in record.layers]
    if unrecorded:
        raise ReassemblyError(f"layer {unrecorded[0]} of the model has no entry in the mask record; locate the "
                              "component on this architecture")
    for name, layer in record.layers.items():
        m = modules[name]
        shape = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        if shape != (layer.in_channels, layer.out_channels):
            raise ReassemblyError(f"layer {name} has {shape[0]} -> {shape[1]} channels but the record says "
                                  f"{layer.in_channels} -> {layer.out_channels}")
    reference = {n: modules[n].weight.detach().clone() for n in record.layers}
    pads = _pad_shortcuts_to_convs(component)
    _refuse_channel_padding(component)
    head = _head_name(record)

    try:
        graph = tp.DependencyGraph().build_dependency(component, example_inputs=example_input)
    except Exception as error:  # noqa: BLE001 - Torch-Pruning raises anything
        raise ReassemblyError(f"Torch-Pruning cannot build the dependency graph of this model: "
                              f"{type(error).__name__}: {error}") from None
    names = {m: n for n, m in component.named_modules()}
    plans = []  # (root module, its pruning function, dropped root indices, names of the recorded members)
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        size = len(group[0].idxs)
        kept, members = set(), []
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            name = names.get(module) if isinstance(module, nn.Module) else None
            if name not in record.layers:
                continue
            if graph.is_out_channel_pruning_fn(handler):
                keep = set(record.layers[name].keep_out)
            elif graph.is_in_channel_pruning_fn(handler):
                keep = set(record.layers[name].keep_in)
            else:
                continue
            members.append(name)
            kept |= {r for i, r in zip(item.idxs, item.root_idxs) if i in keep}
        if not members:
            continue  # e.g. a group of the padding convs alone: nothing recorded decides it
        dropped = sorted(set(range(size)) - kept)
        if len(dropped) == size:
            raise ReassemblyError(f"the component keeps no channel of layer {names.get(root)} "
                                  f"(dependency group of {', '.join(members)})")
        if dropped:
            plans.append((root, group[0].dep.handler, dropped, members))
    for root, handler, dropped, members in plans:
        where = f"layer {names.get(root)} (dependency group of {', '.join(members)})"
        try:
            group = graph.get_pruning_group(root, handler, dropped)
            if not graph.check_pruning_group(group):
                raise ReassemblyError(f"Torch-Pruning refuses to prune {where}: it would empty a layer")
            group.prune()
        except ReassemblyError:
            raise
        except Exception as error:  # noqa: BLE001
            raise ReassemblyError(f"Torch-Pruning cannot prune {where}: {type(error).__name__}: {error}") from None
    _convs_back_to_embeds(component, pads)
    _reorder_head(component, record, head)
    _check(component, record, reference, head, check_weights)

    from ..data import normalization_of, set_normalization

    set_normalization(component, *normalization_of(model))
    if architecture is None:
        architecture, arch_kwargs = _how_to_rebuild(model, record)
    component.reassembly_component = {
        "architecture": architecture, "arch_kwargs": dict(arch_kwargs or {}), "dataset": dataset,
        "record": record.to_dict()}
    component.reassembly_name = f"component of {architecture}"
    component.reassembly_classes = list(record.classes)  # its logits, in order (what `reassembly eval` checks)
    component.reassembly_input_size = list(record.input_size)
    component.reassembly_dataset = dataset
    return component


def _head_name(record: ComponentMasks) -> str:
    return list(record.layers)[-1]


def _reorder_head(component: nn.Module, record: ComponentMasks, head: str) -> None:
    """Torch-Pruning keeps the head's surviving rows in ascending class order; put them in the record's order."""
    layer = component.get_submodule(head)
    order = sorted(record.classes)
    perm = torch.tensor([order.index(c) for c in record.classes])
    if layer.weight.shape[0] != len(order):
        raise ReassemblyError(f"the head {head} has {layer.weight.shape[0]} outputs after pruning, not the "
                              f"{len(order)} chosen classes")
    with torch.no_grad():
        layer.weight.copy_(layer.weight[perm])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[perm])


def _expected_weight(weight: torch.Tensor, layer, is_head: bool, classes) -> torch.Tensor:
    rows = torch.tensor(classes if is_head else layer.keep_out)
    w = weight[rows]
    if layer.groups == 1:
        return w[:, torch.tensor(layer.keep_in)]
    per_group = layer.in_channels // layer.groups
    local = sorted({c % per_group for c in layer.keep_in})
    return w[:, torch.tensor(local)]


def _check(component: nn.Module, record: ComponentMasks, reference: dict, head: str, check_weights: bool) -> None:
    modules = dict(component.named_modules())
    for name, layer in record.layers.items():
        m = modules[name]
        shape = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        want = (len(layer.keep_in), len(layer.keep_out))
        if shape != want:
            raise ReassemblyError(f"Torch-Pruning left layer {name} with {shape[0]} -> {shape[1]} channels, the "
                                  f"record keeps {want[0]} -> {want[1]}; this layer's dependencies are not "
                                  "understood")
        if check_weights:
            expected = _expected_weight(reference[name], layer, name == head, record.classes)
            if expected.shape != m.weight.shape or not torch.equal(expected.to(m.weight.device), m.weight.detach()):
                raise ReassemblyError(f"Torch-Pruning kept other channels of layer {name} than the record says; "
                                      "this layer's dependencies are not understood")


def _how_to_rebuild(model: nn.Module, record: ComponentMasks) -> tuple[str, dict]:
    architecture = getattr(model, "reassembly_name", None)
    if not architecture:
        return type(model).__name__, {}
    kwargs = {"num_classes": record.num_classes, **getattr(model, "reassembly_kwargs", {})}
    pretrained = getattr(model, "reassembly_pretrained", None)
    if pretrained:
        from ..zoo.pretrained import manifest_entry

        kwargs.update(manifest_entry(pretrained).model_kwargs)
    return architecture, kwargs


# ------------------------------------------------------------------------------------------------- saving/loading
def describe_component(component: nn.Module) -> dict:
    """What :func:`rebuild_component` needs to rebuild ``component``'s structure: architecture, kwargs, label
    space, the mask record, normalisation, scaling ratios (if scaled)."""
    info = getattr(component, "reassembly_component", None)
    if info is None:
        raise ReassemblyError("not an extracted component (made by extract_component)")
    meta = {"format": FORMAT, **info, "classes": info["record"]["classes"],
            "normalization": getattr(component, "input_normalization", None)}
    meta.setdefault("dataset", None)
    return meta


def save_component(component: nn.Module, directory) -> Path:
    """Write ``component.safetensors`` + ``component.json`` into ``directory`` (no pickle)."""
    from safetensors.torch import save_file

    meta = describe_component(component)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta["shapes"] = {name: list(p.shape) for name, p in component.state_dict().items()}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in component.state_dict().items()}
    with atomic_path(directory / "component.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    with atomic_path(directory / "component.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return directory


def rebuild_component(meta: dict) -> nn.Module:
    """The structure of a saved component, from its description alone (random weights): create the architecture and
    prune it from the stored masks the same way extraction did."""
    from ..data import set_normalization
    from ..zoo.registry import create_model

    if meta.get("format") != FORMAT:
        raise ReassemblyError(f"not a component description (format {meta.get('format')!r})")
    record = ComponentMasks.from_dict(meta["record"])
    model = create_model(meta["architecture"], **meta["arch_kwargs"]).eval()
    component = extract_component(model, record, architecture=meta["architecture"], arch_kwargs=meta["arch_kwargs"],
                                  check_weights=False, dataset=meta.get("dataset"))
    for key in ("scaling",):
        if meta.get(key) is not None:
            component.reassembly_component[key] = meta[key]
    if meta.get("normalization"):
        set_normalization(component, meta["normalization"]["mean"], meta["normalization"]["std"])
    return component


def read_description(path: Path, fmt: str, what: str) -> dict:
    """The JSON description of a saved component or assembly (``what``), refused unless it says it is one."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReassemblyError(f"cannot read the {what} description {path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ReassemblyError(f"{path.parent} does not hold {'an' if what[0] in 'aeiou' else 'a'} {what} "
                              f"(format {found!r})")
    return meta


def load_weights_exactly(module: nn.Module, path: Path, what: str) -> None:
    """Load ``path`` (safetensors) into a rebuilt ``module``: every tensor and shape must match."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
        raise ReassemblyError(f"cannot read {path}: {error}") from None
    own = module.state_dict()
    bad = [k for k in set(own) | set(state) if k not in own or k not in state or own[k].shape != state[k].shape]
    if bad:
        raise ReassemblyError(f"{path.parent}: the rebuilt {what} does not match the saved weights at {min(bad)}")
    module.load_state_dict(state)


def load_component(directory) -> nn.Module:
    """Rebuild a component saved by :func:`save_component` (:func:`rebuild_component`) and load its weights
    (strictly: every tensor and shape must match)."""
    directory = Path(directory)
    meta = read_description(directory / "component.json", FORMAT, "component")
    try:
        component = rebuild_component(meta)
    except (KeyError, TypeError) as error:
        raise ReassemblyError(f"{directory / 'component.json'} is malformed ({type(error).__name__}: {error})") \
            from None
    load_weights_exactly(component, directory / "component.safetensors", "component")
    return component.eval()


def count_params_macs(model: nn.Module, input_size) -> tuple[int, int]:
    """Parameters (all) and multiply-accumulates of conv/linear layers for one input of ``input_size``."""
    macs = 0

    def hook(m, args, out):
        nonlocal macs
        per_output = m.weight[0].numel()
        macs += per_output * out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return sum(p.numel() for p in model.parameters()), macs
