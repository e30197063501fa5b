"""CKA heatmaps between two models' nodes, as PNG files beside the similarity artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import pyplot, save_png


def _labels(chain: dict) -> list[str]:
    return [f"{node['index']} {node['name'][:18]}" for node in chain["nodes"]]


def plot_pair(points: np.ndarray, chain_a: dict, chain_b: dict, path: str | Path, title: str = "linear CKA") -> Path:
    """Write :func:`pair_figure` to ``path`` as a PNG."""
    return save_png(pair_figure(points, chain_a, chain_b, title), path)


def pair_figure(points: np.ndarray, chain_a: dict, chain_b: dict, title: str = "linear CKA"):
    """Two heatmaps of model A's nodes (rows) against model B's (columns): CKA of their inputs and of their outputs.

    ``points`` is the (L_a + 1, L_b + 1) point matrix; ``chain_a``/``chain_b`` are ``NodeChain.to_dict()`` records."""
    plt = pyplot()
    rows, cols = _labels(chain_a), _labels(chain_b)
    size = (max(7.0, 1.2 + 0.26 * len(cols)) * 2, max(3.5, 1.8 + 0.26 * len(rows)))
    figure, axes = plt.subplots(1, 2, figsize=size, constrained_layout=True)
    for axis, matrix, side in zip(axes, (points[:-1, :-1], points[1:, 1:]), ("inputs", "outputs")):
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        axis.set_yticks(range(len(rows)), rows, fontsize=7)
        axis.set_xlabel(chain_b["model"])
        axis.set_ylabel(chain_a["model"])
        axis.set_title(f"node {side}")
    figure.colorbar(image, ax=axes, shrink=0.8, label="CKA")
    figure.suptitle(f"{chain_a['model']} vs {chain_b['model']}: {title}")
    return figure


def overview_figure(run, debiased: bool = True):
    """Every model pair of a similarity run (:class:`SimilarityRun`) at a glance: a lower-triangular grid whose cell
    (A, B) is the CKA of A's node outputs (rows) against B's (columns), on one colour scale."""
    plt = pyplot()
    names = run.models
    count = len(names)
    side = min(1.6, 11.0 / max(count - 1, 1))
    figure, axes = plt.subplots(count - 1, count - 1, figsize=(side * (count - 1) + 1.6, side * (count - 1) + 0.9),
                                squeeze=False, constrained_layout=True)
    image = None
    for row, a in enumerate(names[1:], start=1):
        for col, b in enumerate(names[:-1]):
            axis = axes[row - 1][col]
            axis.set_xticks([])
            axis.set_yticks([])
            if col >= row:
                axis.axis("off")
                continue
            image = axis.imshow(run.points(a, b, debiased)[1:, 1:], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            if col == 0:
                axis.set_ylabel(a, fontsize=9, rotation=0, ha="right", va="center")
            if row == count - 1:
                axis.set_xlabel(b, fontsize=9, rotation=30, ha="right")
    if count > 2:  # the colour bar goes in the empty upper triangle
        bar = figure.colorbar(image, cax=axes[0][-1].inset_axes([0.0, 0.6, 1.0, 0.12]), orientation="horizontal")
    else:
        bar = figure.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("CKA", fontsize=9)
    figure.suptitle(f"linear CKA{' (debiased)' if debiased else ''} of node outputs", fontsize=11)
    return figure
