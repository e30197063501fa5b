"""What a component is and what it costs: the decision-route picture and the compression report.

* :func:`draw_routes`: a PNG of which input channels of every conv/linear layer each class relies on (the per-class
  relevant inputs of :class:`~reassembly.lego.locate.ComponentMasks`, before the classes are joined), layer by layer
  from the image to the head; a channel used by two or more classes is "shared". Below it, the share of shared,
  single-class and unused channels per layer: MDA's picture of early layers shared by all classes and late layers
  split between them.
* :func:`compression_report`: parameters and MACs of the original and of the component, and the accuracy of both
  per class on labelled images (the original's argmax restricted to the component's classes, the decision the
  component's head makes), as a dict and as Markdown (:func:`report_markdown`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import ImageDataset, Preprocess, normalization_of
from ..errors import ReassemblyError
from .locate import ComponentMasks

SHARED = (1.0, 0.55, 0.0)  # orange, as in the paper's route figures
UNUSED = (0.86, 0.86, 0.86)
ONE_CLASS = (0.35, 0.35, 0.35)  # in the share panel: used by exactly one class (whichever)


def _class_colours(n: int) -> list[tuple[float, float, float]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    palette = [cmap(i)[:3] for i in range(cmap.N) if i not in (1,)]  # tab10's orange is the shared colour
    return [palette[i % len(palette)] for i in range(n)]


def route_table(masks: ComponentMasks) -> tuple[list[str], list[np.ndarray]]:
    """Per layer (call order), a (len(classes), in_channels) bool array: which inputs each class relies on."""
    names, tables = [], []
    for name, layer in masks.layers.items():
        table = np.zeros((len(masks.classes), layer.in_channels), dtype=bool)
        for k, c in enumerate(masks.classes):
            table[k, layer.relevant_in.get(str(c), [])] = True
        names.append(name)
        tables.append(table)
    return names, tables


def draw_routes(masks: ComponentMasks, path, *, class_names=None, title: str | None = None) -> Path:
    """Write the decision-route picture of ``masks`` to ``path`` (PNG, atomically)."""
    from matplotlib.patches import Patch

    from ..plots import pyplot, save_png

    plt = pyplot()

    names, tables = route_table(masks)
    if not names:
        raise ReassemblyError("the mask record has no layer to draw")
    colours = np.array(_class_colours(len(masks.classes)))
    labels = [str(class_names[c]) if class_names else f"class {c}" for c in masks.classes]
    width = max(6.0, min(24.0, 0.22 * len(names) + 3))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 7.5), height_ratios=[3, 1], sharex=True)
    shares = np.zeros((len(names), 3))
    for i, table in enumerate(tables):
        users = table.sum(0)
        image = np.tile(np.array(UNUSED), (table.shape[1], 1))
        single = users == 1
        image[single] = colours[table[:, single].argmax(0)]
        image[users >= 2] = SHARED
        top.imshow(image[::-1, None, :], extent=(i - 0.42, i + 0.42, 0, 1), aspect="auto", interpolation="nearest")
        shares[i] = [(users >= 2).mean(), single.mean(), (users == 0).mean()]
    top.set_xlim(-0.6, len(names) - 0.4)
    top.set_ylim(0, 1)
    top.set_ylabel("input channel (position in the layer)")
    import textwrap

    title = title or f"decision routes of classes {masks.classes}: the input channels each class relies on"
    top.set_title("\n".join(textwrap.wrap(title, int(9 * width))), fontsize=10)
    legend = [Patch(color=colours[k], label=labels[k]) for k in range(len(labels))]
    legend += [Patch(color=SHARED, label="shared (2+ classes)"), Patch(color=UNUSED, label="unused")]
    top.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    x = np.arange(len(names))
    bottom.bar(x, shares[:, 0], color=SHARED, width=0.84)
    bottom.bar(x, shares[:, 1], bottom=shares[:, 0], color=ONE_CLASS, width=0.84, label="one class only")
    bottom.bar(x, shares[:, 2], bottom=shares[:, 0] + shares[:, 1], color=UNUSED, width=0.84)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("share")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    step = max(1, len(names) // 40)
    bottom.set_xticks(x[::step], [names[i] for i in x[::step]], rotation=90, fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


@torch.no_grad()
def logits_in_batches(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's logits (eval mode, no gradients) for preprocessed images ``x``, ``batch_size`` at a time on the
    model's device; returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def compression_report(original: nn.Module, component: nn.Module, dataset: ImageDataset | None, *,
                       split: str = "test", batch_size: int = 500) -> dict:
    """Parameters, MACs and per-class accuracy of ``component`` against ``original`` (see the module docstring).

    ``dataset`` holds images with the original's labels (full label space); only the component's classes are
    scored. None: sizes only."""
    from .extract import count_params_macs

    info = getattr(component, "reassembly_component", None)
    if info is None:
        raise ReassemblyError("not an extracted component (made by extract_component)")
    classes = [int(c) for c in info["record"]["classes"]]
    size = tuple(info["record"]["input_size"])
    params, macs = count_params_macs(original, size)
    c_params, c_macs = count_params_macs(component, size)
    report = {"classes": classes, "input_size": list(size),
              "params": {"original": params, "component": c_params, "ratio": round(c_params / params, 4)},
              "macs": {"original": macs, "component": c_macs, "ratio": round(c_macs / macs, 4)}}
    if dataset is None:
        return report
    rows = torch.nonzero(torch.isin(dataset.labels, torch.tensor(classes)))[:, 0]
    if len(rows) == 0:
        raise ReassemblyError(f"{dataset.name} has no image of classes {classes} to score the component on")
    labels = dataset.labels[rows]
    local = torch.tensor([classes.index(int(c)) for c in labels])
    full = logits_in_batches(original, Preprocess(*normalization_of(original))(dataset.images[rows]), batch_size)
    mine = logits_in_batches(component, Preprocess(*normalization_of(component))(dataset.images[rows]), batch_size)
    hit_original = full[:, classes].argmax(1) == local
    hit_all = full.argmax(1) == labels
    hit_component = mine.argmax(1) == local
    names = dataset.classes
    per_class = []
    for k, c in enumerate(classes):
        own = local == k
        per_class.append({"class": c, "name": names[c] if c < len(names) else str(c), "images": int(own.sum()),
                          "original": round(100 * hit_original[own].double().mean().item(), 2),
                          "component": round(100 * hit_component[own].double().mean().item(), 2)})
    report["accuracy"] = {
        "data": dataset.name, "split": split, "images": len(rows),
        "original": round(100 * hit_original.double().mean().item(), 2),
        "original_all_logits": round(100 * hit_all.double().mean().item(), 2),
        "component": round(100 * hit_component.double().mean().item(), 2), "per_class": per_class}
    return report


def report_markdown(report: dict, title: str = "MDA component") -> str:
    """The compression report (plus the calibration, when the report carries one) as Markdown."""
    from ..text import human

    p, m = report["params"], report["macs"]
    size = "x".join(map(str, report["input_size"]))
    lines = [f"# {title}", "", f"Classes {report['classes']}.", "",
             "| | original | component | component / original |", "|---|---:|---:|---:|",
             (f"| parameters | {p['original']:,} ({human(p['original'])}) | {p['component']:,} "
              f"({human(p['component'])}) | {100 * p['ratio']:.1f} % |"),
             (f"| MACs at {size} | {m['original']:,} ({human(m['original'])}) | {m['component']:,} "
              f"({human(m['component'])}) | {100 * m['ratio']:.1f} % |")]
    acc = report.get("accuracy")
    if acc:
        lines += ["", (f"Accuracy on {acc['images']:,} {acc['split']} images of {acc['data']} (original: argmax over "
                       f"the component's classes only, the component's decision; over all logits it scores "
                       f"{acc['original_all_logits']:.2f} %):"), "",
                  "| class | images | original % | component % |", "|---|---:|---:|---:|"]
        lines += [f"| {r['class']} {r['name']} | {r['images']} | {r['original']:.2f} | {r['component']:.2f} |"
                  for r in acc["per_class"]]
        lines.append(f"| all | {acc['images']} | {acc['original']:.2f} | {acc['component']:.2f} |")
    cal = report.get("calibration")
    if cal:
        verdict = "met" if cal["met"] else "**not met** by any candidate (the most accurate one is used)"
        whole = cal.get("kept_whole") or []
        restored = f"; layers kept whole: {', '.join(whole)}" if whole else ""
        lines += ["", (f"Thresholds calibrated on {cal['held_out_images']} held-out training images: original "
                       f"{cal['original_accuracy']:.2f} %, target {cal['target']:.2f} % {verdict}; chosen conv "
                       f"{cal['alpha']['conv']}/{cal['beta']['conv']}, linear {cal['alpha']['linear']}/"
                       f"{cal['beta']['linear']} (alpha/beta){restored}.")]
        if cal.get("match_loss"):
            lines[-1] += (f" Cross-entropy over the classes, also required to be no worse: component "
                          f"{cal['tried'][cal['chosen']]['loss']:.4f}, original {cal['original_loss']:.4f}.")
    elif report.get("thresholds"):
        t = report["thresholds"]
        lines += ["", (f"Thresholds (alpha/beta): conv {t['alpha']['conv']}/{t['beta']['conv']}, linear "
                       f"{t['alpha']['linear']}/{t['beta']['linear']}.")]
    return "\n".join(lines) + "\n"
