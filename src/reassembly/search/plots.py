"""The search's candidates as a picture: proxy score against parameters, the budget, and the network it chose."""

from __future__ import annotations

from ..plots import pyplot
from ..text import human


def candidates_figure(record: dict):
    """Each candidate of a ``search.json`` record at (parameters, proxy score), labelled with its rank; the choice
    starred, the parameter budget as dashed lines. Candidates the proxy could not score (-inf) are left out."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    proxy = record["proxy"]
    scored = [c for c in record["candidates"] if c.get("proxy") is not None]
    choice = record["choice"]
    figure, axis = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    inside = [c for c in scored if c.get("within_budget", True)]
    outside = [c for c in scored if not c.get("within_budget", True)]
    axis.scatter([c["params"] for c in inside], [c["proxy"] for c in inside], s=28, color="#4878a8",
                 label="candidate (label: rank by the proxy)")
    if outside:
        axis.scatter([c["params"] for c in outside], [c["proxy"] for c in outside], s=34, marker="x",
                     color="#a0a0a0", label="over the budget as measured")
    for c in scored:
        axis.annotate(str(c["rank"]), (c["params"], c["proxy"]), xytext=(4, 3), textcoords="offset points",
                      fontsize=7, color="#444444")
    if choice.get("proxy") is not None:
        axis.scatter([choice["params"]], [choice["proxy"]], s=260, marker="*", color="#d62728", edgecolor="black",
                     linewidth=0.6, zorder=3, label=f"chosen (rank {choice['rank']})")
    bounds = record["budget"].get("params") or {}
    for key, style in (("max", "--"), ("min", ":")):
        if bounds.get(key) is not None:
            axis.axvline(bounds[key], color="#555555", linestyle=style, linewidth=1,
                         label=f"budget: {'at most' if key == 'max' else 'at least'} {human(bounds[key])} params")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: human(value)))
    axis.set_xlabel("parameters of the whole network (stem, blocks, stitches, head)")
    axis.set_ylabel(f"{proxy['name']} score ({proxy.get('better', 'higher')} is better)")
    axis.set_title(f"{len(scored)} candidates of the 0-1 program, re-scored by {proxy['name']} on the assembled "
                   "network", fontsize=10)
    axis.legend(fontsize=8, loc="best")
    axis.grid(alpha=0.3)
    return figure
