"""Reassembly search: budgets, the exact 0-1 program against brute force, top-k enumeration, infeasible budgets."""

import random

import pytest

from reassembly.search import (
    Budget,
    BudgetError,
    brute_force,
    enumerate_top,
    parse_count,
    parse_latency,
    prune,
    random_problem,
)
from reassembly.search.program import best_path


# -- budgets ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("0.5M", 500_000), ("60M", 60_000_000), ("250k", 250_000), ("1.2G", 1.2e9),
                                         ("3e5", 300_000), ("42", 42), (1000, 1000)])
def test_human_sizes(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text, ms", [("2.5ms", 2.5), ("800us", 0.8), ("0.01s", 10.0), ("3", 3.0)])
def test_latencies(text, ms):
    assert parse_latency(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["0.5X", "M", "-1M", "lots"])
def test_unreadable_sizes_are_errors_that_show_the_form(text):
    with pytest.raises(BudgetError, match="0.5M"):
        parse_count(text, "--params")


def test_a_minimum_above_the_maximum_is_refused():
    with pytest.raises(BudgetError, match="--min-params"):
        Budget.parse(params="1M", min_params="2M")
    budget = Budget.parse(params="0.5M", macs="60M", min_params="0.2M")
    assert budget.bounds("params") == (200_000, 500_000) and budget.resources == ("params", "macs")
    assert budget.admits({"params": 500_000, "macs": 1}) and not budget.admits({"params": 500_001, "macs": 1})


# -- the program against brute force ----------------------------------------------------------------------------------
def _budget_at(problem, quantile, resources=("params", "macs"), minimum=None):
    """A budget that admits some but (usually) not all compatible networks: the costs of the network at
    ``quantile`` of them ordered by parameters become the maxima (and a low quantile of ``minimum`` its floor)."""
    everything = sorted(brute_force(problem), key=lambda item: problem.costs(item[1])["params"])
    anchor = problem.costs(everything[int(quantile * (len(everything) - 1))][1])
    bounds = {f"max_{resource}": anchor[resource] for resource in resources}
    if minimum:
        values = sorted(problem.costs(choice)[minimum] for _, choice in everything)
        bounds[f"min_{minimum}"] = min(values[len(values) // 10], anchor[minimum])
    return Budget(**bounds)


@pytest.mark.parametrize("seed", range(24))
def test_the_program_equals_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    problem = random_problem(models=rng.choice([4, 5, 6]), positions=rng.choice([3, 4]), seed=seed,
                             forbid=rng.choice([0.0, 0.3, 0.6]), stage_aligned=seed % 3 != 0, pair_terms=seed % 2 == 0,
                             latency=seed % 4 == 0)
    resources = ("params", "macs", "latency") if seed % 4 == 0 else rng.choice([("params",), ("params", "macs")])
    budget = _budget_at(problem, rng.choice([0.1, 0.4, 0.9]), resources, minimum="macs" if seed % 5 == 0 else None)
    reference = brute_force(problem, budget)
    best = enumerate_top(problem, budget, top_k=1)
    assert best.solutions[0].objective == pytest.approx(reference[0][0], abs=1e-9)
    assert problem.compatible(best.solutions[0].choice) and budget.admits(best.solutions[0].costs)
    assert best.solutions[0].status == "optimal" and best.gap == 0.0


@pytest.mark.parametrize("method", ["partition", "cuts"])
@pytest.mark.parametrize("seed", range(6))
def test_top_k_enumeration_returns_the_k_best_in_order(seed, method):
    problem = random_problem(models=5, positions=4, seed=100 + seed, forbid=0.3, stage_aligned=seed % 2 == 0,
                             pair_terms=True)
    budget = _budget_at(problem, 0.5)
    reference = brute_force(problem, budget)
    k = min(12, len(reference))
    found = enumerate_top(problem, budget, top_k=k, method=method)
    assert [s.objective for s in found.solutions] == pytest.approx([value for value, _ in reference[:k]], abs=1e-9)
    assert len({s.choice for s in found.solutions}) == k  # no network twice
    for solution in found.solutions:  # each is a feasible network with the costs and objective the problem gives it
        assert problem.compatible(solution.choice) and budget.admits(solution.costs)
        assert solution.costs == problem.costs(solution.choice)


def test_asking_for_more_networks_than_exist_returns_all_of_them():
    problem = random_problem(models=3, positions=3, seed=7, forbid=0.4)
    budget = _budget_at(problem, 0.5)
    reference = brute_force(problem, budget)
    for method in ("partition", "cuts"):
        found = enumerate_top(problem, budget, top_k=len(reference) + 5, method=method)
        assert sorted(s.choice for s in found.solutions) == sorted(choice for _, choice in reference)
        assert found.exhausted


def test_budget_pruning_and_the_path_bound_never_lose_a_feasible_network():
    for seed in range(10):
        problem = random_problem(models=5, positions=4, seed=seed, forbid=0.3, pair_terms=True)
        budget = _budget_at(problem, 0.3, minimum="params")
        pruned = prune(problem, budget)
        assert brute_force(pruned, budget) == brute_force(problem, budget)
        assert pruned.allowed_pairs() <= problem.allowed_pairs()
        bound = best_path(problem)[0]
        assert bound >= brute_force(problem)[0][0] - 1e-9


def test_an_infeasible_budget_names_the_smallest_achievable_cost():
    problem = random_problem(models=5, positions=4, seed=3, forbid=0.3)
    smallest = min(problem.costs(choice)["params"] for _, choice in brute_force(problem))
    with pytest.raises(BudgetError) as error:
        enumerate_top(problem, Budget(max_params=int(smallest) - 1))
    message = str(error.value)
    assert "--params" in message and f"{smallest / 1e3:.2f}K" in message and "\n" not in message
    largest = max(problem.costs(choice)["macs"] for _, choice in brute_force(problem))
    with pytest.raises(BudgetError, match=f"largest network.*{largest / 1e6:.2f}M MACs"):
        enumerate_top(problem, Budget(min_macs=int(largest) + 1))
    # each bound can be met alone, not both: the message gives the best cost within the other bound
    everything = brute_force(problem)
    cheapest_params = min(everything, key=lambda item: problem.costs(item[1])["params"])[1]
    macs_of_it = problem.costs(cheapest_params)["macs"]
    cheapest_macs = min(problem.costs(choice)["macs"] for _, choice in everything)
    if cheapest_macs < macs_of_it:
        budget = Budget(max_params=int(problem.costs(cheapest_params)["params"]), max_macs=int(cheapest_macs))
        if not brute_force(problem, budget):
            with pytest.raises(BudgetError, match="within the other bounds the smallest network has"):
                enumerate_top(problem, budget)


def test_a_problem_with_no_compatible_network_says_why():
    problem = random_problem(models=3, positions=3, seed=1)
    problem.allowed[1][:] = False
    problem.reasons[(1, 0, 0)] = "m0:1 -> m0:2: made incompatible by the test"
    with pytest.raises(BudgetError, match="made incompatible by the test"):
        enumerate_top(problem, Budget(max_params=10**9))
