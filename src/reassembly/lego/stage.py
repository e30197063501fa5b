"""The whole of MDA as two calls: :func:`disassemble` (a trained model and its training data -> a component) and
:func:`assemble_components` (saved components -> one classifier), with their folders written whole or not at all.
``reassembly disassemble`` and ``reassembly assemble`` are thin layers over them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..data import ImageDataset, Preprocess, normalization_of
from ..errors import ReassemblyError
from ..io import atomic_dir, write_text
from .calibrate import Calibration, calibrate_thresholds, held_out_indices
from .contribution import accumulate_contributions
from .locate import ALPHA, BETA, ComponentMasks, channel_graph, locate_component
from .samples import SampleSelection, select_samples


@dataclass
class Disassembly:
    """A component and how it was found."""

    component: nn.Module
    masks: ComponentMasks
    selection: SampleSelection
    calibration: Calibration | None
    seconds: float


def check_classes(classes, num_classes: int, where: str = "the model") -> list[int]:
    """The class list as ints: non-empty, distinct, each in 0..num_classes-1 (else a one-line error)."""
    classes = list(classes or [])
    if not classes:
        raise ReassemblyError("the class list is empty; name at least one class to disassemble for, e.g. 0,1,2")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
    if bad:
        raise ReassemblyError(f"class {bad[0]!r} is not an integer class index")
    out = [c for c in classes if not 0 <= c < num_classes]
    if out:
        raise ReassemblyError(f"class {out[0]} does not exist: {where} has {num_classes} classes (0..{num_classes - 1})")
    if len(set(classes)) != len(classes):
        raise ReassemblyError(f"the class list {classes} names a class twice")
    return [int(c) for c in classes]


def check_disassemblable(model: nn.Module, input_size, model_name: str = "model") -> int:
    """Fail early, naming the layer or operation, for a model MDA cannot follow or Torch-Pruning cannot prune (before
    any data is read): the channel graph must be understood and channel padding must be the zoo's. Returns the
    number of logits."""
    import copy

    from .extract import _pad_shortcuts_to_convs, _refuse_channel_padding

    graph, flows = channel_graph(model, tuple(input_size), model_name)
    twin = copy.deepcopy(model)
    _pad_shortcuts_to_convs(twin)
    _refuse_channel_padding(twin)
    logits = next(node for node in graph.nodes if node.op == "output").args[0]
    if logits not in flows:
        raise ReassemblyError(f"{model_name} must return one logits tensor")
    return flows[logits].channels


def disassemble(model: nn.Module, train: ImageDataset, classes, *, per_class: int = 50, alpha: dict | None = None,
                beta: dict | None = None, calibrate: bool = False, held_out: int = 500, tolerance: float = 0.0,
                grid: dict | None = None, restore: bool = True, match_loss: bool = False, seed: int = 0,
                input_size=(3, 32, 32), model_name: str = "model", dataset: str | None = None) -> Disassembly:
    """The component of ``model`` for ``classes`` (MDA steps 1-4) from its training images ``train`` (labels = the
    model's outputs): the ``per_class`` most confident correct images per class give the contributions; the
    thresholds are ``alpha``/``beta`` (default: the paper's) or, with ``calibrate``, the cheapest grid point whose
    component keeps the original's accuracy on ``held_out`` other training images per class
    (:func:`~reassembly.lego.calibrate.calibrate_thresholds`; ``restore``: when no grid point is, keep the layers
    whose pruning costs accuracy whole; ``match_loss``: the held-out cross-entropy must not grow either).
    ``dataset`` names the label space for assembly."""
    started = time.time()
    classes = check_classes(classes, train.num_classes, train.name)
    check_disassemblable(model, input_size, model_name)
    from .extract import extract_component

    model.eval()
    mean, std = normalization_of(model)
    selection = select_samples(model, train, per_class, classes=classes)
    index, labels = selection.flat()
    contributions = accumulate_contributions(model, Preprocess(mean, std)(train.images[index]), labels,
                                             train.num_classes)
    calibration = None
    if calibrate:
        rest = held_out_indices(train, classes, index.tolist(), held_out, seed=seed)
        calibration = calibrate_thresholds(model, contributions, classes, train.subset(rest), grid=grid,
                                           tolerance=tolerance, input_size=input_size, model_name=model_name,
                                           restore=restore, match_loss=match_loss)
        masks = calibration.masks
    else:
        masks = locate_component(model, contributions, classes, input_size=input_size, alpha=alpha, beta=beta,
                                 model_name=model_name)
    component = extract_component(model, masks, dataset=dataset)
    return Disassembly(component, masks, selection, calibration, round(time.time() - started, 1))


def write_component(result: Disassembly, model: nn.Module, out, *, test: ImageDataset | None = None,
                    overwrite: bool = False, class_names=None, info: dict | None = None) -> dict:
    """Write the component folder ``out`` whole or not at all: component.safetensors + component.json, routes.png
    (decision routes), report.json + report.md (parameters, MACs, per-class accuracy on ``test`` when given)."""
    from .extract import save_component
    from .report import compression_report, draw_routes, report_markdown

    report = compression_report(model, result.component, test)
    report["thresholds"] = {"alpha": result.masks.alpha, "beta": result.masks.beta}
    report["samples_per_class"] = [len(result.selection.indices[c]) for c in result.masks.classes]
    if result.calibration is not None:
        report["calibration"] = result.calibration.to_dict()
    report.update(info or {})
    report["seconds"] = result.seconds
    with atomic_dir(out, overwrite) as tmp:
        save_component(result.component, tmp)
        draw_routes(result.masks, tmp / "routes.png", class_names=class_names)
        write_text(tmp / "report.json", json.dumps(report, indent=1) + "\n")
        write_text(tmp / "report.md", report_markdown(report, f"MDA component of {info.get('model', 'a model')}"
                                                      if info else "MDA component"))
    return report


# ---------------------------------------------------------------------------------------------------- assembly
def load_components(directories) -> list[nn.Module]:
    """The components saved in ``directories`` (each written by ``reassembly disassemble``)."""
    from .extract import load_component

    components = []
    for directory in directories:
        if not (Path(directory) / "component.json").is_file():
            raise ReassemblyError(f"{directory} holds no component (no component.json); make one with `reassembly "
                                  "disassemble MODEL --classes ... --data ... --out DIR`")
        components.append(load_component(directory))
    return components


def assemble_components(components: list[nn.Module], *, mode: str = "parallel", scale: bool = False,
                        scale_data: dict | None = None, scale_per_class: int | None = 200, seed: int = 0) -> nn.Module:
    """The assembly of ``components`` (:func:`~reassembly.lego.assemble.assemble`), each head first scaled on its
    training images when ``scale`` (``scale_data[i]``: component i's training split with its source labels)."""
    import copy

    from .assemble import assemble, scale_head

    if scale:
        components = [copy.deepcopy(c) for c in components]
        for i, component in enumerate(components):
            data = (scale_data or {}).get(i)
            if data is None:
                raise ReassemblyError(f"component {i + 1} has no training data to scale its head with")
            scale_head(component, data, per_class=scale_per_class, seed=seed)
    return assemble(components, mode)


def write_assembly(assembly: nn.Module, components: list[nn.Module], out, *, overwrite: bool = False,
                   info: dict | None = None) -> dict:
    """Write the assembly folder ``out`` whole or not at all: assembly.safetensors + assembly.json and report.json
    (parameters and MACs against the sum of the parts)."""
    from .assemble import save_assembly
    from .extract import count_params_macs

    size = tuple(assembly.reassembly_input_size)
    parts = [count_params_macs(c, size) for c in components]
    params, macs = count_params_macs(assembly, size)
    report = {"mode": assembly.reassembly_assembly["mode"], "classes": assembly.reassembly_assembly["classes"],
              "params": params, "macs": macs, "params_of_parts": [p for p, _ in parts],
              "macs_of_parts": [m for _, m in parts], **(info or {})}
    with atomic_dir(out, overwrite) as tmp:
        save_assembly(assembly, tmp)
        write_text(tmp / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def thresholds(alpha_conv=None, beta_conv=None, alpha_linear=None, beta_linear=None) -> tuple[dict, dict]:
    """alpha/beta dicts from optional per-kind values (the paper's where not given), each checked to lie in [0, 1)."""
    alpha = {**ALPHA, **{k: v for k, v in (("conv", alpha_conv), ("linear", alpha_linear)) if v is not None}}
    beta = {**BETA, **{k: v for k, v in (("conv", beta_conv), ("linear", beta_linear)) if v is not None}}
    for name, values in (("alpha", alpha), ("beta", beta)):
        for kind, value in values.items():
            if not 0 <= value < 1:
                raise ReassemblyError(f"{name} for {kind} layers must lie in [0, 1), not {value}")
    return alpha, beta

