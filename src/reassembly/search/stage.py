"""The search stage: ``partition.json`` + target data + budget + proxy -> ``search.json`` (``reassembly search``).

1. Build the search space of the partition (:mod:`.space`): candidates per position, compatible pairs, exact costs.
   A first block may keep its model's own stem, so every zoo model is itself a candidate network.
2. Find the networks to score. When at most ``max_scored`` networks meet the budget, all of them
   (:func:`.problem.feasible_networks`): the proxy sees every candidate. Otherwise the 0-1 program ranks them by a
   surrogate (the sum of per-block proxy terms measured inside each block's own model, :mod:`.terms`, or the
   parameter count for a proxy without block terms) and its ``top_k`` best are scored (:mod:`.program`).
3. Assemble each of them (:func:`reassembly.stitch.build_network`; for a *transfer* proxy also fitted in closed form
   on ``probe_size`` target training images, as ``reassembly stitch`` fits it, and scored on other images), check
   its parameters and MACs against the program's, and score it with the proxy.
4. Rank the assembled networks by that score; the best one within the budget is the ``choice``. Where each zoo
   model (its own stem and blocks, a new head) ranked is listed under ``zoo_models``.

``search.json`` holds the settings, how the scored networks were selected (``selection``: every feasible one, or the
program's top-k and the surrogate that chose them), the program's report (status, optimality gap, solve times,
size), every block's surrogate term, the ranked candidates (block specs in order, parameters, MACs, latency when budgeted, proxy score,
program objective and rank) and ``choice``, whose ``blocks`` string is what ``reassembly stitch --blocks`` takes.
"""

from __future__ import annotations

import contextlib
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
from .problem import feasible_networks
from .program import Solution, enumerate_top
from .proxies import get_proxy, target_batches
from .space import SearchSpace, build_space, load_source, own_model_choice
from .terms import block_terms, normalised

FORMAT = "reassembly.search/2"
MAX_SCORED = 1000  # score every feasible network up to this many
PROBE_SIZE = 256  # images a transfer proxy fits each network on


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
                 max_scored: int = MAX_SCORED, probe_size: int = PROBE_SIZE, own_stems: bool = True,
                 also: tuple[str, ...] = (), progress: bool = False) -> dict:
    """Search the partition in ``directory`` for the networks within ``budget`` that ``proxy`` ranks best on
    ``data``'s training images (a dataset spec, or an :class:`~reassembly.data.ImageDataset` of them); write
    ``search.json`` (default: beside the partition) and return its record. ``max_per_class`` draws the proxy's
    images only from the seeded subset that stitching and training use. The proxies named in ``also`` score the
    same networks on the same images (each candidate's ``scores``), without changing the ranking."""
    started = time.perf_counter()
    path = partition_path(directory)
    record = read_partition(path)
    scorer = get_proxy(proxy)
    others = [get_proxy(name) for name in also if name != scorer.name]
    if top_k < 1 or max_scored < 0:
        raise ReassemblyError(f"--top-k {top_k} --max-scored {max_scored}: score at least one network")
    if batches < 1 or batch_size < 2:
        raise ReassemblyError(f"--batches {batches} --batch-size {batch_size}: proxies need at least one batch of "
                              "two or more images")
    fitted = scorer.fitted or any(other.fitted for other in others)
    if fitted and probe_size < 2:
        raise ReassemblyError(f"--probe-size {probe_size}: a transfer proxy fits each network on at least two "
                              "images")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    sources = {model["name"]: load_source(model["name"]) for model in record["models"]}
    timings["load_models"] = time.perf_counter() - clock

    clock = time.perf_counter()
    images = _TargetImages(data, sources, data_root, max_per_class, fitted, probe_size, batches, batch_size, seed)
    timings["load_data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    space = build_space(record, sources, images.target.num_classes, order, latency="latency" in budget.resources,
                        latency_repeats=latency_repeats, own_stems=own_stems)
    problem = space.problem
    timings["build_space"] = time.perf_counter() - clock
    enumerate_top(problem, budget, 1, time_limit, method)  # an impossible budget fails here, before the proxy runs

    clock = time.perf_counter()
    objective, notes = _surrogate(space, scorer, images.raw, seed)
    timings["block_terms"] = time.perf_counter() - clock

    clock = time.perf_counter()
    feasible = feasible_networks(problem, budget, max_scored)
    if feasible is not None:
        ordered = sorted(feasible, key=lambda choice: (-problem.objective(choice), choice))
        solutions = [Solution(choice, problem.names(choice), problem.objective(choice), problem.costs(choice),
                              "enumerated", 0.0, 0.0) for choice in ordered]
        selection = {"kind": "all", "feasible": len(feasible), "scored": len(feasible),
                     "text": f"every one of the {len(feasible)} networks within the budget"}
        program = enumerate_top(problem, budget, 1, time_limit, method).to_dict()  # the surrogate's optimum
        program.update({"enumerated": len(feasible), "exhausted": True,
                        "seconds": round(time.perf_counter() - clock, 4)})
    else:
        enumeration = enumerate_top(problem, budget, top_k, time_limit, method)
        solutions = enumeration.solutions
        selection = {"kind": "program", "feasible": f"more than {max_scored}", "scored": len(solutions),
                     "text": f"the program's top {len(solutions)} of more than {max_scored} networks within the "
                             f"budget, by {objective}"}
        program = enumeration.to_dict()
    timings["program"] = time.perf_counter() - clock

    clock = time.perf_counter()
    candidates = _score(space, solutions, [scorer, *others], images, budget, seed, latency_repeats, progress)
    timings["assemble_and_score"] = time.perf_counter() - clock
    best, more_notes = _rank(candidates, scorer)
    notes += more_notes + _check_macs(space, solutions, best, images)
    program.update({"objective": objective, "method": method, "time_limit": time_limit,
                    "space": problem.space, "compatible_pairs": problem.allowed_pairs(),
                    "excluded_pairs": len(problem.reasons), "excluded_first_blocks": sorted(problem.unusable.values())})
    result = {
        "format": FORMAT,
        "partition": str(path),
        "data": images.target.name,
        "classes": list(images.target.classes),
        "input_size": list(images.size),
        "budget": budget.to_dict(),
        "budget_text": budget.describe(),
        "proxy": {"name": scorer.name, "description": scorer.description,
                  "better": "higher" if scorer.higher_is_better else "lower", "fitted": scorer.fitted},
        "also": [{"name": other.name, "better": "higher" if other.higher_is_better else "lower",
                  "fitted": other.fitted} for other in others],
        "settings": {"top_k": top_k, "max_scored": max_scored, "seed": seed, "max_per_class": max_per_class,
                     "batches": len(next(iter(images.raw.values()))), "batch_size": batch_size,
                     "probe_size": probe_size if fitted else None, "own_stems": own_stems, "order": order,
                     "resolution": "trained",
                     "init": "least-squares (as reassembly stitch)" if scorer.fitted else "default (seeded)",
                     "latency_repeats": latency_repeats if "latency" in budget.resources else None},
        "selection": selection,
        "program": program,
        "block_terms": {spec: float(problem.term[k][i]) for k, position in enumerate(problem.labels)
                        for i, spec in enumerate(position)},
        "scored": len(candidates),
        "candidates": candidates,
        "zoo_models": zoo_ranks(space, budget, candidates),
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


class _TargetImages:
    """The target's training images at every input size the zoo needs: the proxy's batches (uint8) and, for a
    transfer proxy, the probe each network is fitted on, drawn first so the batches lie outside it."""

    def __init__(self, data, sources, data_root, max_per_class, fitted, probe_size, batches, batch_size, seed):
        from ..data import ImageDataset, load_dataset
        from ..stitch.stage import probe_split

        self.raw, self.probe, datasets = {}, {}, {}
        for size in sorted({s.input_size for s in sources.values()}):
            if isinstance(data, ImageDataset):  # the caller's own images (a split of the training set, say)
                if tuple(data.images.shape[1:]) != size:
                    raise ReassemblyError(f"{data.name} holds images of {tuple(data.images.shape[1:])}, the zoo "
                                          f"needs {size}: give a dataset spec instead")
                dataset = data
            else:
                dataset = load_dataset(data, "train", root=data_root, image_size=size[1], channels=size[0],
                                       max_per_class=max_per_class, seed=0)  # the subset training uses
            datasets[size] = dataset
            needed = probe_size + 2 if fitted else 2
            if len(dataset) < needed:
                raise ReassemblyError(f"{dataset.name} train holds {len(dataset)} images; the proxy needs at least "
                                      f"{needed}" + (" (lower --probe-size)" if fitted else ""))
            if fitted:
                probe, rest = probe_split(len(dataset), probe_size, seed)
                self.probe[size] = dataset.subset(probe)
                self.raw[size] = target_batches(dataset.images[rest], dataset.labels[rest], batches, batch_size, seed)
            else:
                self.raw[size] = target_batches(dataset.images, dataset.labels, batches, batch_size, seed)
        self.size = next(iter(datasets))
        self.target = datasets[self.size]


def _surrogate(space: SearchSpace, scorer, raw, seed: int) -> tuple[str, list[str]]:
    """Set the program's objective (what ranks networks before any is assembled); returns its description."""
    problem = space.problem
    if scorer.resource is not None:
        problem.term = [scorer.sign * values for values in problem.unary[scorer.resource]]
        problem.pair_term = [scorer.sign * values for values in problem.pair[scorer.resource]]
        return f"exact: the network's {scorer.resource} (blocks, stem, head and stitches)", []
    if scorer.decomposes:
        terms, notes = block_terms(space, scorer, raw, seed)
        problem.term = [np.asarray(t, dtype=np.float64) for t in terms]
        return (f"sum of the chosen blocks' {scorer.name} terms, each measured inside its own pretrained model "
                "on the target batches (see the proxy's documentation)"), notes
    problem.term = [values.copy() for values in problem.unary["params"]]
    problem.pair_term = [values.copy() for values in problem.pair["params"]]
    return f"parameters (proxy {scorer.name} gives no block terms)", []


def _score(space: SearchSpace, solutions: list[Solution], scorers: list, images: _TargetImages, budget: Budget,
           seed: int, latency_repeats: int, progress: bool) -> list[dict]:
    """Assemble every solution, check its costs, and score it with each of ``scorers`` (the first ranks), fitting it
    first for a transfer proxy. Networks are fitted in the lexicographic order of their blocks, so that each starts
    from the longest prefix fitted before (:class:`~reassembly.stitch.init.FitCache`); the scoring images ride along
    the fit."""
    from ..stitch import build_network
    from ..stitch.init import FitCache, least_squares_init
    from .proxies import Fitted

    caches = {size: FitCache(probe.images, torch.cat([x for x, _ in images.raw[size]]))
              for size, probe in images.probe.items()}
    labels = {size: torch.cat([y for _, y in batches]).long() for size, batches in images.raw.items()}
    fitted = any(scorer.fitted for scorer in scorers)
    order = sorted(range(len(solutions)), key=lambda i: solutions[i].choice) if fitted else range(len(solutions))
    candidates: list[dict | None] = [None] * len(solutions)
    bar = tqdm(order, total=len(solutions), desc="assembling and scoring", unit="net", disable=not progress,
               leave=False)
    for index in bar:
        solution = solutions[index]
        torch.manual_seed(seed)
        blocks = space.source_blocks(solution.choice)
        net = build_network(blocks, images.target.num_classes, classes=list(images.target.classes))
        size = tuple(net.structure.input_size)
        measured = {"params": count_params(net), "macs": round(solution.costs["macs"])}  # exact (tested)
        if "latency" in budget.resources:
            measured["latency"] = measure_latency(net, torch.zeros(1, *size), repeats=latency_repeats)
        scores = {}
        for scorer in scorers:
            if not scorer.fitted:
                mean, std = net.input_normalization["mean"], net.input_normalization["std"]
                scores[scorer.name] = scorer.score(net, normalised(images.raw[size], mean, std), seed)
        if fitted:
            probe = images.probe[size]
            with _buffers_kept(net.blocks):  # the fit re-estimates the blocks' norms, which the zoo models share
                report = least_squares_init(net, blocks, probe.images, probe.labels, cache=caches[size],
                                            progress=False)
            features, fc = report["carried"].double(), net.head.fc
            logits = torch.nn.functional.linear(features, fc.weight.detach().double(), fc.bias.detach().double())
            for scorer in scorers:
                if scorer.fitted:
                    scores[scorer.name] = scorer.score_fitted(Fitted(features, logits, labels[size]))
        score = scores[scorers[0].name]
        candidates[index] = {
            "blocks": solution.names,
            "params": measured["params"],
            "macs": measured["macs"],
            **({"latency_ms": round(measured["latency"], 4),
                "latency_ms_predicted": round(solution.costs["latency"], 4)} if "latency" in measured else {}),
            "proxy": _finite(score),
            **({"scores": {name: _finite(value) for name, value in scores.items()}} if len(scorers) > 1 else {}),
            "program_rank": index + 1,
            "program_objective": solution.objective,
            "solve": {"status": solution.status, "gap": solution.gap, "seconds": round(solution.seconds, 4)},
            "within_budget": budget.admits(measured),
            "costs_match_program": measured["params"] == solution.costs["params"],
            "_score": score,
        }
    return candidates


def _check_macs(space: SearchSpace, solutions: list[Solution], best: dict, images: _TargetImages) -> list[str]:
    """Count the chosen network's MACs on the assembled network (the candidates carry the program's exact count;
    counting every one would cost more than scoring it)."""
    from ..stitch import build_network

    solution = next(s for s in solutions if s.names == best["blocks"])
    net = build_network(space.source_blocks(solution.choice), images.target.num_classes)
    counted = count_macs(net, tuple(net.structure.input_size))
    if counted == best["macs"]:
        return []
    best["costs_match_program"] = False
    return [f"the chosen network has {counted:,} MACs as assembled, {best['macs']:,} by the program's count"]


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module):
    """Restore every buffer of ``module`` (batch-norm statistics) on leaving."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def _rank(candidates: list[dict], scorer) -> tuple[dict, list[str]]:
    """Sort ``candidates`` best first (ties: the program's order), number them, and pick the best within budget."""
    def key(candidate):
        score = candidate["_score"] * scorer.sign
        return (-(score if not math.isnan(score) else -math.inf), candidate["program_rank"])

    candidates.sort(key=key)
    for rank, candidate in enumerate(candidates, start=1):
        candidate["rank"] = rank
        del candidate["_score"]
    notes = []
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
    return best, notes


def zoo_ranks(space: SearchSpace, budget: Budget, candidates: list[dict]) -> list[dict]:
    """Each zoo model as a candidate (its own stem and blocks, a new head): its cost, whether it fits the budget,
    and its rank among the scored networks (``None`` when it was not scored or is not in the space)."""
    ranked = {tuple(c["blocks"]): c for c in candidates}
    rows = []
    for name in space.sources:
        choice = own_model_choice(space, name)
        if choice is None:
            rows.append({"name": name, "blocks": None, "within_budget": None, "rank": None,
                         "note": "not in the space (own stems off, or its blocks cannot follow one another)"})
            continue
        names = space.problem.names(choice)
        costs = space.problem.costs(choice)
        scored = ranked.get(tuple(names))
        fits = budget.admits(costs) and space.problem.compatible(choice)
        rows.append({"name": name, "blocks": ",".join(names), "params": int(costs["params"]),
                     "macs": int(costs["macs"]), "within_budget": fits,
                     "rank": scored["rank"] if scored else None, "proxy": scored["proxy"] if scored else None,
                     "note": "" if scored else ("over the budget" if not fits else "not among the scored networks")})
    return rows
