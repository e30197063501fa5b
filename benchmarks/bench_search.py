"""How fast the exact 0-1 program is, and that it is exact, on synthetic zoos of 50 models cut into K = 4 blocks.

Each synthetic zoo (:func:`reassembly.search.random_problem`, one seed each) has 50 candidates per position, stitch
costs on every pair of consecutive positions, a quarter of the pairs forbidden and some blocks barred from coming
first: 6.25 million combinations. For each zoo and each budget (none; a loose and a tight bound on parameters and
MACs, the costs of the network at the 50th and 5th percentile of parameters among the compatible ones) it measures:

* the time to solve the program once (``enumerate_top(top_k=1)``, wall time including building the program and the
  budget pruning; and the HiGHS call alone), against the target of 1 s;
* the time to enumerate the top 20, by branching on the no-good cuts (the default) and by adding them as rows;
* an exhaustive search in numpy over all combinations (vectorised), whose top 20 objectives the program's must equal.

Then, for deeper zoos (``--scaling``: K = 5 and 6, 312 million and 15.6 billion combinations, one seed each), where
no exhaustive search fits in memory, the same solve and top-k times; and the program on a real partition (default:
the shipped Split-CIFAR one) against a brute force in Python.

    python benchmarks/bench_search.py [--seeds 3] [--models 50] [--k 4] [--top-k 20] [--threads 1] [--no-cuts]
                                      [--scaling 5,6]

``--proxies fit,logme,knn,naswot,...`` instead times the whole search on the real partition with each proxy, every
feasible network assembled and scored (``--budget 1.5M,100M``: the larger Split-CIFAR problem), and prints the time
per scored network of each and its ratio to the fastest, measured in one run:

    python benchmarks/bench_search.py --proxies fit,logme,knn,naswot,synflow,params --budget 1.5M,100M --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import scipy
import torch

from reassembly.search import Budget, brute_force, enumerate_top, random_problem

REPO = Path(__file__).resolve().parents[1]


def exhaustive(problem, budget: Budget, top_k: int) -> tuple[list[float], int]:
    """Top objectives over every combination (stage-aligned problems: one set per position), by broadcasting, and the
    number of feasible networks."""
    positions = problem.positions

    def spread(vector, k):  # a per-candidate array along axis k of a K-dimensional grid
        shape = [1] * positions
        shape[k] = len(vector)
        return vector.reshape(shape)

    def pairwise(matrix, k):  # a pair matrix along axes k, k+1
        shape = [1] * positions
        shape[k], shape[k + 1] = matrix.shape
        return matrix.reshape(shape)

    mask = spread(problem.usable[0], 0)
    for k in range(positions):
        mask = mask & spread(problem.usable[k], k)
    for k in range(positions - 1):
        mask = mask & pairwise(problem.allowed[k], k)
    for resource in budget.resources:
        low, high = budget.bounds(resource)
        total = sum(spread(problem.unary[resource][k], k) for k in range(positions))
        total = total + sum(pairwise(problem.pair[resource][k], k) for k in range(positions - 1))
        if high is not None:
            mask = mask & (total <= high * (1 + 1e-9))
        if low is not None:
            mask = mask & (total >= low * (1 - 1e-9))
    objective = sum(spread(problem.term[k], k) for k in range(positions))
    if problem.pair_term is not None:
        objective = objective + sum(pairwise(problem.pair_term[k], k) for k in range(positions - 1))
    values = np.where(mask, objective, -np.inf).ravel()
    feasible = int(mask.sum())
    count = min(top_k, feasible)
    best = np.argpartition(-values, count - 1)[:count] if count else np.array([], dtype=int)
    return sorted(values[best].tolist(), reverse=True), feasible


def budgets_for(problem, rng: np.random.Generator, samples: int = 20000) -> dict[str, Budget]:
    """Budgets from the costs of sampled compatible networks: none, loose (median parameters), tight (5th pct)."""
    choices = []
    sizes = problem.sizes
    while len(choices) < 400:
        draw = tuple(int(rng.integers(0, n)) for n in sizes)
        if problem.compatible(draw):
            choices.append(draw)
        samples -= 1
        if samples <= 0:
            break
    costs = sorted((problem.costs(c) for c in choices), key=lambda c: c["params"])
    loose, tight = costs[len(costs) // 2], costs[len(costs) // 20]
    return {"none": Budget(), "loose": Budget(max_params=int(loose["params"]), max_macs=int(loose["macs"])),
            "tight": Budget(max_params=int(tight["params"]), max_macs=int(tight["macs"]))}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def real_partition(path: Path, top_k: int) -> str:
    from reassembly.search import build_space, load_source

    record = json.loads(path.read_text())
    sources = {m["name"]: load_source(m["name"]) for m in record["models"]}
    space = build_space(record, sources, num_classes=5)
    problem = space.problem
    problem.term = [np.asarray(v, dtype=float) for v in problem.unary["params"]]  # any objective: params
    budget = Budget.parse(params="0.5M", macs="60M")
    _, solve = timed(lambda: enumerate_top(problem, budget, 1))
    many, enum = timed(lambda: enumerate_top(problem, budget, top_k))
    reference, brute = timed(lambda: brute_force(problem, budget, top_k))
    same = np.allclose([s.objective for s in many.solutions], [v for v, _ in reference])
    return (f"real partition {path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
            f"{len(record['models'])} models, K={problem.positions}, {problem.space:,} combinations, "
            f"{problem.allowed_pairs()} compatible pairs; budget {budget.describe()}: solve {solve * 1000:.1f} ms, "
            f"top-{top_k} {enum * 1000:.1f} ms ({many.solves} solves), brute force (Python) {brute * 1000:.0f} ms; "
            f"top-{top_k} equal to brute force: {same}")


def proxy_times(path: Path, proxies: list[str], budget: Budget, data: str) -> None:
    """The search with each proxy over every feasible network of the partition at ``path``: seconds per network."""
    import tempfile

    from reassembly.search import search_stage

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in proxies:
            start = time.perf_counter()
            record = search_stage(path, data, budget, proxy=name, seed=0, out=Path(scratch) / f"{name}.json")
            total = time.perf_counter() - start
            scoring = record["timings"]["assemble_and_score"]
            rows.append((name, record["scored"], total, scoring / record["scored"], record["selection"]["kind"]))
            print(f"{name:>16}: {record['scored']} networks ({record['selection']['kind']}), search {total:.1f} s, "
                  f"{scoring / record['scored']:.3f} s per scored network", flush=True)
    fastest = min(per for _, _, _, per, _ in rows)
    print(f"budget {budget.describe()} on {data}; seconds per scored network, ratio to the fastest:")
    for name, count, total, per, _ in rows:
        print(f"  {name:>16} {per:8.3f} s  {per / fastest:6.1f}x  (whole search {total:.1f} s, {count} networks; "
              f"target for the default proxy: at most 300 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--forbid", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cuts", action="store_true", help="Skip the (slower) enumeration with cut rows.")
    parser.add_argument("--scaling", default="5,6", help="Deeper K to time without exhaustive search ('' for none).")
    parser.add_argument("--partition", type=Path, default=REPO / "results" / "split-cifar" / "partition.json")
    parser.add_argument("--proxies", default="", help="Time the search on --partition with these proxies instead.")
    parser.add_argument("--budget", default="1.5M,100M", help="With --proxies: PARAMS,MACS.")
    parser.add_argument("--data", default="cifar10[5:10]", help="With --proxies: the target task.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores, no GPU used; {torch.get_num_threads()} torch thread(s); "
          f"python {platform.python_version()}, scipy {scipy.__version__}; commit {commit}; "
          f"{time.strftime('%Y-%m-%d')}")
    if args.proxies:
        params, macs = args.budget.split(",")
        proxy_times(args.partition, [p.strip() for p in args.proxies.split(",")], Budget.parse(params, macs),
                    args.data)
        return
    print(f"synthetic zoos: {args.models} models, K = {args.k}, {args.models ** args.k:,} combinations each, "
          f"{args.forbid:.0%} of pairs forbidden, top-{args.top_k}")
    header = (f"{'seed':>4} {'budget':>6} {'feasible':>10} {'pairs kept':>10} {'solve s':>8} {'HiGHS s':>8} "
              f"{'top-k s':>8} {'solves':>6} {'cuts s':>8} {'numpy s':>8}  equal")
    print(header)
    rows = []
    for seed in range(args.seeds):
        problem = random_problem(args.models, args.k, seed=seed, forbid=args.forbid)
        for name, budget in budgets_for(problem, np.random.default_rng(seed)).items():
            one, solve = timed(lambda: enumerate_top(problem, budget, 1))  # noqa: B023 - called at once
            many, enum = timed(lambda: enumerate_top(problem, budget, args.top_k))  # noqa: B023
            cuts = None
            if not args.no_cuts:
                with_rows, cuts = timed(lambda: enumerate_top(problem, budget, args.top_k, method="cuts"))  # noqa: B023
                assert np.allclose([s.objective for s in with_rows.solutions], [s.objective for s in many.solutions])
            (reference, feasible), brute = timed(lambda: exhaustive(problem, budget, args.top_k))  # noqa: B023
            equal = np.allclose([s.objective for s in many.solutions], reference, atol=1e-9)
            rows.append({"solve": solve, "first": one.first_seconds, "enum": enum, "cuts": cuts, "brute": brute,
                         "equal": equal, "budget": name})
            print(f"{seed:>4} {name:>6} {feasible:>10,} {many.pairs_kept:>10} {solve:>8.3f} {one.first_seconds:>8.3f} "
                  f"{enum:>8.3f} {many.solves:>6} {'-' if cuts is None else f'{cuts:8.3f}':>8} {brute:>8.3f}  {equal}",
                  flush=True)
    solves = [r["solve"] for r in rows]
    enums = [r["enum"] for r in rows]
    print(f"solve once: median {statistics.median(solves):.3f} s, max {max(solves):.3f} s (target < 1 s); "
          f"HiGHS call alone: median {statistics.median(r['first'] for r in rows):.3f} s")
    print(f"top-{args.top_k}: median {statistics.median(enums):.3f} s, max {max(enums):.3f} s; "
          f"top-{args.top_k} / solve once: median {statistics.median(e / s for e, s in zip(enums, solves)):.1f}x")
    if not args.no_cuts:
        print(f"cut rows / branching on cuts (top-{args.top_k}): median "
              f"{statistics.median(r['cuts'] / r['enum'] for r in rows):.1f}x, max "
              f"{max(r['cuts'] / r['enum'] for r in rows):.1f}x")
    print(f"exhaustive numpy / program top-{args.top_k}: median "
          f"{statistics.median(r['brute'] / r['enum'] for r in rows):.1f}x; program equal to exhaustive search in "
          f"{sum(r['equal'] for r in rows)} of {len(rows)} cases")
    for k in [int(v) for v in args.scaling.split(",") if v.strip()]:
        problem = random_problem(args.models, k, seed=0, forbid=args.forbid)
        for name, budget in budgets_for(problem, np.random.default_rng(0)).items():
            if name == "none":
                continue
            one, solve = timed(lambda: enumerate_top(problem, budget, 1))  # noqa: B023 - called at once
            many, enum = timed(lambda: enumerate_top(problem, budget, args.top_k))  # noqa: B023
            print(f"K = {k} ({problem.space:.3g} combinations), {name} budget: solve once {solve:.3f} s (HiGHS "
                  f"{one.first_seconds:.3f} s), top-{args.top_k} {enum:.3f} s ({many.solves} solves)", flush=True)
    if args.partition and args.partition.is_file():
        print(real_partition(args.partition, args.top_k))


if __name__ == "__main__":
    main()
