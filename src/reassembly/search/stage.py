"""The search stage: ``partition.json`` + target data + budget + proxy -> ``search.json`` (``reassembly search``).

1. Build the search space of the partition (:mod:`.space`): candidates per position, compatible pairs, exact costs.
2. Measure every block's proxy term inside its own model on seeded target batches (:mod:`.terms`).
3. Solve the 0-1 program exactly and enumerate its ``top_k`` best networks (:mod:`.program`).
4. Assemble each of them (:func:`reassembly.stitch.build_network`, default initialisation from the seed, no
   training), check its parameters and MACs against the program's, and score it with the proxy.
5. Rank the assembled networks by that score; the best one within the budget is the ``choice``.

``search.json`` holds the settings, the program's report (status, optimality gap, solve times, size), every
block's term, the ranked candidates (block specs in order, parameters, MACs, latency when budgeted, proxy score,
program objective and rank) and ``choice``, whose ``blocks`` string is what ``reassembly stitch --blocks`` takes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ReassemblyError
from ..io import write_text
from ..measure import count_macs, count_params, measure_latency
from .budget import Budget, format_amount
from .program import enumerate_top
from .proxies import get_proxy, target_batches
from .space import build_space, load_source
from .terms import block_terms, normalised

FORMAT = "reassembly.search/1"


def partition_path(directory: str | Path) -> Path:
    """``DIR/partition.json`` (or the file itself), checked to exist."""
    path = Path(directory)
    if path.is_dir():
        path = path / "partition.json"
    if not path.is_file():
        raise ReassemblyError(f"no partition at {path}: run `reassembly partition DIR` first (it writes "
                              "DIR/partition.json), or give the partition file itself")
    return path


def read_partition(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReassemblyError(f"{path} is not valid JSON ({exc}); re-run `reassembly partition`") from None
    if not str(record.get("format", "")).startswith("reassembly.partition") or "models" not in record:
        raise ReassemblyError(f"{path} is not a partition written by `reassembly partition`")
    return record


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def search_stage(directory: str | Path, data: str, budget: Budget, *, proxy: str = "naswot", top_k: int = 20,
                 seed: int = 0, batches: int = 5, batch_size: int = 32, order: str = "dery",
                 method: str = "partition", time_limit: float | None = None, out: str | Path | None = None,
                 data_root=None, latency_repeats: int = 20, max_per_class: int | None = None,
                 progress: bool = False) -> dict:
    """Search the partition in ``directory`` for the networks within ``budget`` that ``proxy`` ranks best on
    ``data``'s training images; write ``search.json`` (default: beside the partition) and return its record.
    ``max_per_class`` draws the proxy's images only from the seeded subset that stitching and training use."""
    from ..data import load_dataset
    from ..stitch import build_network

    started = time.perf_counter()
    path = partition_path(directory)
    record = read_partition(path)
    scorer = get_proxy(proxy)
    if top_k < 1:
        raise ReassemblyError(f"--top-k {top_k}: enumerate at least one network")
    if batches < 1 or batch_size < 2:
        raise ReassemblyError(f"--batches {batches} --batch-size {batch_size}: proxies need at least one batch of "
                              "two or more images")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    sources = {model["name"]: load_source(model["name"]) for model in record["models"]}
    timings["load_models"] = time.perf_counter() - clock

    clock = time.perf_counter()
    datasets, raw = {}, {}
    for size in sorted({s.input_size for s in sources.values()}):
        datasets[size] = load_dataset(data, "train", root=data_root, image_size=size[1], channels=size[0],
                                      max_per_class=max_per_class, seed=0)  # the subset training uses
        if len(datasets[size]) < 2:
            raise ReassemblyError(f"{datasets[size].name} train holds {len(datasets[size])} images; the proxies "
                                  "need at least two")
        raw[size] = target_batches(datasets[size].images, datasets[size].labels, batches, batch_size, seed)
    target = next(iter(datasets.values()))
    timings["load_data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    space = build_space(record, sources, target.num_classes, order, latency="latency" in budget.resources,
                        latency_repeats=latency_repeats)
    problem = space.problem
    timings["build_space"] = time.perf_counter() - clock
    enumerate_top(problem, budget, 1, time_limit, method)  # an impossible budget fails here, before the proxy runs

    clock = time.perf_counter()
    notes: list[str] = []
    if scorer.resource is not None:
        objective = f"exact: the network's {scorer.resource} (blocks, stem, head and stitches)"
        problem.term = [scorer.sign * values for values in problem.unary[scorer.resource]]
        problem.pair_term = [scorer.sign * values for values in problem.pair[scorer.resource]]
    elif scorer.decomposes:
        objective = (f"sum of the chosen blocks' {scorer.name} terms, each measured inside its own pretrained model "
                     "on the target batches (see the proxy's documentation)")
        terms, notes = block_terms(space, scorer, raw, seed)
        problem.term = [np.asarray(t, dtype=np.float64) for t in terms]
    else:
        objective = (f"parameters: proxy {scorer.name} gives no block terms, so the program orders networks by size "
                     "and only the re-ranking uses the proxy")
        problem.term = [values.copy() for values in problem.unary["params"]]
        problem.pair_term = [values.copy() for values in problem.pair["params"]]
    timings["block_terms"] = time.perf_counter() - clock

    enumeration = enumerate_top(problem, budget, top_k, time_limit, method)
    timings["program"] = enumeration.seconds

    clock = time.perf_counter()
    candidates = []
    solutions = enumeration.solutions
    bar = tqdm(solutions, desc="assembling and scoring", unit="net", disable=not progress, leave=False)
    for rank, solution in enumerate(bar, start=1):
        torch.manual_seed(seed)
        net = build_network(space.source_blocks(solution.choice), target.num_classes, classes=list(target.classes))
        size = tuple(net.structure.input_size)
        measured = {"params": count_params(net), "macs": count_macs(net, size)}
        if "latency" in budget.resources:
            measured["latency"] = measure_latency(net, torch.zeros(1, *size), repeats=latency_repeats)
        mean, std = net.input_normalization["mean"], net.input_normalization["std"]
        score = scorer.score(net, normalised(raw[size], mean, std), seed)
        exact = all(measured[r] == solution.costs[r] for r in ("params", "macs"))
        candidates.append({
            "blocks": solution.names,
            "params": measured["params"],
            "macs": measured["macs"],
            **({"latency_ms": round(measured["latency"], 4),
                "latency_ms_predicted": round(solution.costs["latency"], 4)} if "latency" in measured else {}),
            "proxy": _finite(score),
            "program_rank": rank,
            "program_objective": solution.objective,
            "solve": {"status": solution.status, "gap": solution.gap, "seconds": round(solution.seconds, 4)},
            "within_budget": budget.admits(measured),
            "costs_match_program": exact,
            "_score": score,
        })
    timings["assemble_and_score"] = time.perf_counter() - clock

    def key(candidate):
        score = candidate["_score"] * scorer.sign
        return (-(score if not math.isnan(score) else -math.inf), candidate["program_rank"])

    candidates.sort(key=key)
    for rank, candidate in enumerate(candidates, start=1):
        candidate["rank"] = rank
        del candidate["_score"]
    fitting = [c for c in candidates if c["within_budget"]]
    best = (fitting or candidates)[0]
    if not fitting:
        notes.append("no assembled candidate met the budget as measured (latency is re-measured after assembly); "
                     "the choice is the best-ranked one")
    elif best is not candidates[0]:
        notes.append(f"the choice is rank {best['rank']}: the better-ranked candidates exceed the budget as measured "
                     "after assembly (latency)")
    mismatched = [c["blocks"] for c in candidates if not c["costs_match_program"]]
    if mismatched:
        notes.append(f"{len(mismatched)} assembled networks differ in parameters or MACs from the program's count")
    program = enumeration.to_dict()
    program.update({"objective": objective, "method": method, "time_limit": time_limit,
                    "space": problem.space, "compatible_pairs": problem.allowed_pairs(),
                    "excluded_pairs": len(problem.reasons), "excluded_first_blocks": sorted(problem.unusable.values())})
    result = {
        "format": FORMAT,
        "partition": str(path),
        "data": target.name,
        "classes": list(target.classes),
        "input_size": list(next(iter(datasets))),
        "budget": budget.to_dict(),
        "budget_text": budget.describe(),
        "proxy": {"name": scorer.name, "description": scorer.description,
                  "better": "higher" if scorer.higher_is_better else "lower"},
        "settings": {"top_k": top_k, "seed": seed, "max_per_class": max_per_class,
                     "batches": len(next(iter(raw.values()))),
                     "batch_size": batch_size, "order": order, "resolution": "trained",
                     "init": "default (seeded)", "latency_repeats": latency_repeats if "latency" in budget.resources else None},
        "program": program,
        "block_terms": {spec: float(problem.term[k][i]) for k, position in enumerate(problem.labels)
                        for i, spec in enumerate(position)},
        "scored": len(candidates),
        "candidates": candidates,
        "choice": {"blocks": ",".join(best["blocks"]), "rank": best["rank"], "params": best["params"],
                   "macs": best["macs"], "proxy": best["proxy"],
                   "summary": f"{format_amount('params', best['params'])}, {format_amount('macs', best['macs'])}"},
        "notes": notes,
        "timings": {name: round(seconds, 3) for name, seconds in timings.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    out_path = Path(out) if out is not None else path.parent / "search.json"
    write_text(out_path, json.dumps(result, indent=1) + "\n")
    result["out"] = str(out_path)
    return result
