"""CKA heatmaps between two models' nodes, as PNG files beside the similarity artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path


def _labels(chain: dict) -> list[str]:
    return [f"{node['index']} {node['name'][:18]}" for node in chain["nodes"]]


def plot_pair(points: np.ndarray, chain_a: dict, chain_b: dict, path: str | Path, title: str = "linear CKA") -> Path:
    """Two heatmaps of model A's nodes (rows) against model B's (columns): CKA of their inputs and of their outputs.

    ``points`` is the (L_a + 1, L_b + 1) point matrix; ``chain_a``/``chain_b`` are ``NodeChain.to_dict()`` records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return Path(path)
