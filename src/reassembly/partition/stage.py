"""The partition stage: read a similarity run, cut every model into K blocks grouped in K equivalence sets.

Reads: the similarity stage's directory (``similarity.json``: the chains; ``cka/*.npz``: point CKA per pair).
Writes: ``partition.json`` (the settings, the score, every model's blocks with their node range, names, parameters,
MACs and input/output shapes, the equivalence sets with their anchors, and per-restart diagnostics) and
``partition.png`` beside it, one row per model with its blocks coloured by equivalence set. A block's ``spec``
``MODEL:i-j`` names nodes ``i .. j-1`` of that model's chain, as ``chain[i:j]`` and ``reassembly stitch --blocks``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import write_text
from ..similarity import load_similarity
from .cover import partition
from .result import ModelNodes, PartitionError

FORMAT = "reassembly.partition/1"
_BLOCK_FIELDS = ("in_shape", "in_format", "in_channels", "in_reduction")
_END_FIELDS = ("out_shape", "format", "channels", "reduction")


def model_nodes(chain: dict) -> ModelNodes:
    """What the partition needs of a dissected model (``NodeChain.to_dict()``): its body range and node sizes."""
    body = [node["index"] for node in chain["nodes"] if node["kind"] == "body"]
    if not body:
        raise PartitionError(f"model {chain['model']} has no body nodes between its stem and head to partition")
    return ModelNodes(
        name=chain["model"],
        body=(body[0], body[-1] + 1),
        node_params=tuple(node["params"] for node in chain["nodes"]),
        node_names=tuple(node["name"] for node in chain["nodes"]),
    )


def _describe_block(chain: dict, block: dict) -> dict:
    nodes = chain["nodes"][block["start"] : block["stop"]]
    names = [node["name"] for node in nodes]
    return {
        **block,
        "spec": f"{chain['model']}:{block['start']}-{block['stop']}",
        "nodes": names,
        "name": names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}",
        "macs": sum(node["macs"] for node in nodes),
        **{field: nodes[0][field] for field in _BLOCK_FIELDS},
        **{field: nodes[-1][field] for field in _END_FIELDS},
    }


def partition_zoo(
    similarity_dir: str | Path,
    k: int = 4,
    eps: float = 0.2,
    *,
    out: str | Path | None = None,
    debiased: bool = True,
    plot: bool = True,
    **options,
) -> dict:
    """Partition the zoo of a similarity run into ``k`` equivalence sets; write and return the partition record.

    ``options`` go to :func:`reassembly.partition.partition` (``size``, ``stage_aligned``, ``similarity``,
    ``restarts``, ``iterations``, ``patience``, ``seed``, ``progress``). ``debiased`` (default) reads debiased CKA, else the biased one."""
    run = load_similarity(similarity_dir)
    chains = {name: run.chain(name) for name in run.models}
    models = [model_nodes(chain) for chain in chains.values()]
    names = run.models
    points = {(a, b): run.points(a, b, debiased) for i, a in enumerate(names) for b in names[i + 1 :]}
    result = partition(models, points, k, eps, **options)
    record = result.to_dict()
    for model in record["models"]:
        model["blocks"] = [_describe_block(chains[model["name"]], block) for block in model["blocks"]]
    record = {
        "format": FORMAT,
        "similarity": {"directory": str(Path(similarity_dir)), "cka": "debiased" if debiased else "biased",
                       "settings": run.index["settings"]},
        **record,
    }
    path = Path(out) if out is not None else Path(similarity_dir) / "partition.json"
    if plot:
        from .plots import plot_partition

        plot_partition(record, chains, path.with_suffix(".png"))
    write_text(path, json.dumps(record, indent=1) + "\n")
    return record
