"""Training curves: loss and accuracy per epoch of several runs on one pair of axes, to compare them."""

from __future__ import annotations

from ..plots import pyplot


def curves_figure(logs: dict[str, list[dict]], start: dict[str, float] | None = None, title: str = "training"):
    """Train loss (left) and test top-1 (right, solid; train top-1 dashed) per epoch of each run.

    ``logs`` maps a label to its ``log.jsonl`` records (``epoch``, ``train_loss``, ``train_top1``, ``test_top1``);
    ``start`` optionally maps a label to its test top-1 before training, drawn at epoch 0. The first label is drawn
    heavier: it is the run the others are compared with."""
    plt = pyplot()
    start = start or {}
    figure, (loss_axis, top1_axis) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for index, (label, records) in enumerate(logs.items()):
        style = {"color": colours(index % 10), "linewidth": 2.2 if index == 0 else 1.2, "marker": "o",
                 "markersize": 4}
        epochs = [r["epoch"] for r in records]
        loss_axis.plot(epochs, [r.get("train_loss") for r in records], label=label, **style)
        tested = [r for r in records if r.get("test_top1") is not None]
        x = [r["epoch"] for r in tested]
        y = [r["test_top1"] for r in tested]
        if label in start:
            x, y = [0, *x], [start[label], *y]
        top1_axis.plot(x, y, label=label, **style)
        top1_axis.plot(epochs, [r.get("train_top1") for r in records], linestyle="--", color=style["color"],
                       linewidth=0.9, marker=".", alpha=0.7)
    last = max((r["epoch"] for records in logs.values() for r in records), default=1)
    loss_axis.set_title("train loss", fontsize=10)
    top1_axis.set_title("top-1 % (solid: test, dashed: train)", fontsize=10)
    for axis in (loss_axis, top1_axis):
        axis.set_xlabel("epoch" + (" (0: before training)" if start and axis is top1_axis else ""))
        axis.grid(alpha=0.3)
        if last <= 20:
            axis.set_xticks(range(0 if start and axis is top1_axis else 1, last + 1))
    top1_axis.legend(fontsize=8, loc="best")
    figure.suptitle(title, fontsize=11)
    return figure
