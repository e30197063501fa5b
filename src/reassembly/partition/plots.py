"""The partition diagram: one row per model, its nodes as cells, its blocks coloured by equivalence set."""

from __future__ import annotations

from pathlib import Path

from ..plots import pyplot, save_png


def plot_partition(record: dict, chains: dict[str, dict], path: str | Path) -> Path:
    """Write :func:`partition_figure` to ``path`` as a PNG."""
    return save_png(partition_figure(record, chains), path)


def partition_figure(record: dict, chains: dict[str, dict]):
    """Draw ``record`` (a partition record) over the chains (``NodeChain.to_dict()`` by model name)."""
    from matplotlib.patches import Patch, Rectangle

    plt = pyplot()

    models = record["models"]
    width = max(len(chains[model["name"]]["nodes"]) for model in models)
    colours = plt.get_cmap("tab10" if len(record["sets"]) <= 10 else "tab20")
    figure, axis = plt.subplots(figsize=(max(8.0, 0.55 * width + 3), 0.6 * len(models) + 1.6), constrained_layout=True)
    for row, model in enumerate(models):
        y = len(models) - 1 - row
        nodes = chains[model["name"]]["nodes"]
        for node in nodes:
            if node["kind"] != "body":
                axis.add_patch(Rectangle((node["index"], y + 0.15), 1, 0.7, facecolor="#dddddd", edgecolor="white"))
                axis.text(node["index"] + 0.5, y + 0.5, node["kind"], ha="center", va="center", fontsize=6,
                          color="#666666")
        for block in model["blocks"]:
            span = block["stop"] - block["start"]
            axis.add_patch(Rectangle((block["start"], y + 0.1), span, 0.8, facecolor=colours(block["set"]),
                                     edgecolor="black", linewidth=0.8))
            for index in range(block["start"] + 1, block["stop"]):
                axis.plot([index, index], [y + 0.1, y + 0.9], color="white", linewidth=0.6)
            label = f"{block['params'] / 1e3:.0f}K" if block["params"] >= 1e3 else str(block["params"])
            axis.text(block["start"] + span / 2, y + 0.5, label, ha="center", va="center", fontsize=7)
    axis.set_xlim(0, width)
    axis.set_ylim(-0.1, len(models))
    axis.set_yticks([len(models) - 0.5 - row for row in range(len(models))],
                    [model["name"] for model in models], fontsize=8)
    axis.set_xlabel("chain node index (cells are nodes; label: block parameters)")
    config = record["config"]
    mode = "stage-aligned" if config["stage_aligned"] else "general clustering"
    axis.set_title(f"partition into K={config['k']} equivalence sets ({mode}, eps={config['eps']:g}, "
                   f"size cap in {config['size']}), score {record['score']:.2f}")
    handles = [Patch(facecolor=colours(index), edgecolor="black", label=f"set {index}")
               for index in range(len(record["sets"]))]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    for side in ("top", "right", "left"):
        axis.spines[side].set_visible(False)
    return figure
