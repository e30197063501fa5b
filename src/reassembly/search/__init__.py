"""Reassembly search (DeRy stage 3): pick one block per equivalence set, under budgets, with a training-free proxy.

Reads ``partition.json`` (from ``reassembly partition``) and target training images; writes ``search.json``: every
network within the budget (or, when there are too many, those the exact 0-1 program ranks best), assembled and
ranked by the proxy, where each zoo model ranked, and the ``choice`` that ``reassembly stitch --blocks`` takes.

>>> budget = Budget.parse(params="0.5M", macs="60M")
>>> record = search_stage("runs/sim", "cifar10[5:10]", budget, proxy="naswot", top_k=20)
>>> record["choice"]["blocks"]

One module per idea: :mod:`.budget` (bounds and human sizes), :mod:`.problem` (the problem as arrays, brute
force, every feasible network, synthetic instances, budget pruning), :mod:`.program` (the MILP and top-k enumeration), :mod:`.space`
(candidates, compatibility rules and exact costs from a partition), :mod:`.proxies` (the transfer proxies fit,
LogME and k-NN; NASWOT, synflow, jacob_cov, grad_norm; the size baselines; and the registry), :mod:`.terms` (per-block objective terms) and :mod:`.stage`.
"""

from .budget import Budget, BudgetError, parse_count, parse_latency
from .problem import Problem, brute_force, feasible_networks, prune, random_problem
from .program import Enumeration, Solution, enumerate_top, explain_infeasible
from .proxies import (
    Proxy,
    ProxyError,
    available_proxies,
    get_proxy,
    register_proxy,
    target_batches,
)
from .space import SearchSpace, build_space, load_source
from .stage import search_stage

__all__ = [
    "Budget",
    "BudgetError",
    "Enumeration",
    "Problem",
    "Proxy",
    "ProxyError",
    "SearchSpace",
    "Solution",
    "available_proxies",
    "brute_force",
    "build_space",
    "enumerate_top",
    "explain_infeasible",
    "feasible_networks",
    "get_proxy",
    "load_source",
    "parse_count",
    "parse_latency",
    "prune",
    "random_problem",
    "register_proxy",
    "search_stage",
    "target_batches",
]
