"""Reassembly search: budgets, the exact 0-1 program against brute force, top-k enumeration, infeasible budgets, the
search space of the shipped partition (compatibility rules, exact costs), the proxies, and the CLI."""

import json
import math
import random

import numpy as np
import pytest
import torch

from reassembly.measure import count_macs, count_params
from reassembly.search import (
    Budget,
    BudgetError,
    ProxyError,
    brute_force,
    build_space,
    enumerate_top,
    get_proxy,
    load_source,
    parse_count,
    parse_latency,
    prune,
    random_problem,
    register_proxy,
    target_batches,
)
from reassembly.search.program import best_path
from reassembly.search.proxies import PROXIES
from reassembly.search.terms import SourceNet, normalised
from reassembly.stitch import build_network, parse_blocks

from .conftest import REPO
from .test_cli import assert_one_line_error, run

PARTITION = REPO / "results" / "split-cifar" / "partition.json"


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


def test_a_time_limit_that_stops_the_solver_says_so():
    problem = random_problem(models=50, positions=6, seed=0)
    with pytest.raises(BudgetError, match="time limit"):
        enumerate_top(problem, Budget(max_params=400_000), top_k=2, time_limit=1e-4)


def test_a_problem_with_no_compatible_network_says_why():
    problem = random_problem(models=3, positions=3, seed=1)
    problem.allowed[1][:] = False
    problem.reasons[(1, 0, 0)] = "m0:1 -> m0:2: made incompatible by the test"
    with pytest.raises(BudgetError, match="made incompatible by the test"):
        enumerate_top(problem, Budget(max_params=10**9))


# -- the search space of the shipped partition ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo():
    record = json.loads(PARTITION.read_text())
    sources = {model["name"]: load_source(model["name"]) for model in record["models"]}
    return record, sources


@pytest.fixture(scope="module")
def spaces(zoo):
    record, sources = zoo
    return {order: build_space(record, sources, num_classes=5, order=order) for order in ("dery", "any")}


def test_the_program_counts_parameters_and_macs_exactly_as_the_assembled_network(spaces):
    for order, space in spaces.items():
        problem = space.problem
        feasible = brute_force(problem)
        assert feasible, order
        for _, choice in random.Random(0).sample(feasible, 4):
            net = build_network(space.source_blocks(choice), num_classes=5)
            predicted = problem.costs(choice)
            assert (predicted["params"], predicted["macs"]) == (count_params(net), count_macs(net, (3, 32, 32)))


def test_compatibility_rules_of_the_shipped_partition(spaces):
    dery, anything = spaces["dery"], spaces["any"]
    first = [c.spec for c in dery.candidates[0]]
    vit = first.index("vit_cifar5:1-3")
    assert not dery.problem.usable[0][vit] and "order rule" in dery.problem.unusable[(0, vit)]
    assert anything.problem.usable[0][vit]  # our stem can make tokens
    # a transformer block before a CNN block: only with --order any
    ordered = [(k, a, b) for (k, a, b), reason in dery.problem.reasons.items() if "order rule" in reason]
    assert ordered and all(dery.candidates[k][a].tokens_out and dery.candidates[k + 1][b].input.is_map
                           for k, a, b in ordered)
    assert any(anything.problem.allowed[k][a, b] for k, a, b in ordered)
    # a block is never fed a smaller map than it was trained on
    vgg = [c.spec for c in dery.candidates[0]].index("vgg11_cifar5:1-2")
    resnet = [c.spec for c in dery.candidates[1]].index("resnet20_cifar5:4-6")
    assert not anything.problem.allowed[0][vgg, resnet]
    assert "trained on a 32x32 grid but would receive 8x8" in anything.problem.reasons[(0, vgg, resnet)]
    # consecutive blocks of one model need no stitch
    own = [c.spec for c in dery.candidates[1]].index("resnet20_cifar5:4-6")
    mine = [c.spec for c in dery.candidates[0]].index("resnet20_cifar5:1-4")
    assert dery.problem.allowed[0][mine, own] and dery.problem.pair["params"][0][mine, own] == 0
    assert dery.stitches[(0, mine, own)] is None


def test_pair_costs_include_the_stitch(spaces):
    space = spaces["dery"]
    specs = ["resnet20_cifar5:1-4", "mobilenetv2_cifar5:3-7", "vgg11_cifar5:3-5", "vgg11_cifar5:5-8"]
    choice = space.index(specs)
    net = build_network(space.source_blocks(choice), num_classes=5)
    stitch = count_params(net.stitches[0])
    assert stitch > 0 and space.problem.pair["params"][0][choice[0], choice[1]] == stitch
    blocks = sum(c.params for c in (space.candidates[k][i] for k, i in enumerate(choice)))
    assert space.problem.costs(choice)["params"] == count_params(net) > blocks


# -- proxies ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_net(zoo):
    _, sources = zoo
    blocks = [sources["resnet20_cifar5"].source_block(1, 4), sources["mobilenetv2_cifar5"].source_block(3, 7),
              sources["vit_cifar5"].source_block(4, 5), sources["vit_cifar5"].source_block(5, 7)]
    torch.manual_seed(0)
    net = build_network(blocks, num_classes=4)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (48,), generator=generator)
    batches = normalised(target_batches(images, labels, batches=2, batch_size=12, seed=0),
                         net.input_normalization["mean"], net.input_normalization["std"])
    return net, batches


@pytest.mark.parametrize("name", ["naswot", "synflow", "jacob_cov", "grad_norm", "params", "macs"])
def test_each_proxy_scores_a_stitched_zoo_network_deterministically(small_net, name):
    net, batches = small_net
    before = {key: value.clone() for key, value in net.state_dict().items()}
    proxy = get_proxy(name)
    first, second = proxy.score(net, batches, seed=0), proxy.score(net, batches, seed=0)
    assert first == second and math.isfinite(first)
    assert all(torch.equal(before[key], value) for key, value in net.state_dict().items())  # scored on a copy
    if proxy.resource is None:
        terms = proxy.block_terms(net, batches, list(net.blocks), seed=0)
        assert len(terms) == 4 and all(math.isfinite(t) for t in terms)
        assert terms == proxy.block_terms(net, batches, list(net.blocks), seed=0)


def test_proxy_signs_and_scales_hold_on_the_zoo_network(small_net):
    net, batches = small_net
    assert get_proxy("params").score(net, batches) == count_params(net)
    assert get_proxy("macs").score(net, batches) == count_macs(net, (3, 32, 32))
    assert get_proxy("jacob_cov").score(net, batches) <= -12 * (1 - 1e-3)  # at most about -batch size
    n = batches[0][0].shape[0]
    assert 0 < get_proxy("naswot").score(net, batches) < n * math.log(1e8)
    grad_terms = get_proxy("grad_norm").block_terms(net, batches, list(net.blocks))
    assert sum(grad_terms) <= get_proxy("grad_norm").score(net, batches)  # the blocks' share of the whole sum


def test_naswot_counts_functional_activations(zoo):
    """The CIFAR ResNets apply F.relu in forward: module hooks would see no units in their blocks."""
    _, sources = zoo
    source = sources["resnet20_cifar5"]
    torch.manual_seed(0)
    net = SourceNet(source, [(1, 4), (4, 6), (6, 9), (9, 10)], num_classes=5)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    terms = get_proxy("naswot").block_terms(net, [(images, torch.zeros(8, dtype=torch.long))], list(net.blocks))
    assert all(term > 1.0 for term in terms)  # log det(K + I) of a block without units would be log det(I) = 0


def test_users_register_their_own_proxies(small_net):
    net, batches = small_net
    name = "test_output_norm"
    PROXIES.pop(name, None)

    def output_norm(model, data):
        with torch.no_grad():
            return float(model(data[0][0]).norm())

    proxy = register_proxy(name, output_norm, description="norm of the logits")
    try:
        assert get_proxy(name) is proxy and not proxy.decomposes
        assert proxy.score(net, batches) == proxy.score(net, batches) > 0
        with pytest.raises(ProxyError, match="already registered"):
            register_proxy(name, output_norm)
    finally:
        PROXIES.pop(name, None)
    with pytest.raises(ProxyError, match="unknown proxy 'nope'"):
        get_proxy("nope")
    imported = get_proxy("reassembly.search.proxies.naswot:naswot")
    assert imported.decomposes and imported.score(net, batches) == get_proxy("naswot").score(net, batches)
    PROXIES.pop("reassembly.search.proxies.naswot:naswot", None)


def test_target_batches_are_seeded_disjoint_draws():
    images = torch.arange(100).view(100, 1, 1, 1).to(torch.uint8)
    labels = torch.arange(100)
    first = target_batches(images, labels, batches=5, batch_size=8, seed=0)
    assert [len(y) for _, y in first] == [8] * 5
    drawn = torch.cat([y for _, y in first])
    assert len(set(drawn.tolist())) == 40 and drawn.tolist() != list(range(40))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, target_batches(images, labels, 5, 8, seed=0)))
    assert not torch.equal(first[0][1], target_batches(images, labels, 5, 8, seed=1)[0][1])


# -- the stage and the command ----------------------------------------------------------------------------------------
def test_search_command_end_to_end_on_the_shipped_partition(tmp_path):
    out = tmp_path / "search.json"
    proc = run("search", str(PARTITION.parent), "--data", "digits", "--params", "0.5M", "--macs", "60M",
               "--top-k", "3", "--batches", "2", "--batch-size", "16", "--threads", "1", "--out", str(out))
    record = json.loads(out.read_text())
    assert record["program"]["status"] == "optimal" and record["program"]["gap"] == 0.0
    assert record["scored"] == 3 and [c["rank"] for c in record["candidates"]] == [1, 2, 3]
    scores = [c["proxy"] for c in record["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(c["program_rank"] for c in record["candidates"]) == [1, 2, 3]
    objectives = sorted((c["program_rank"], c["program_objective"]) for c in record["candidates"])
    assert [o for _, o in objectives] == sorted((o for _, o in objectives), reverse=True)
    for candidate in record["candidates"]:
        assert candidate["params"] <= 500_000 and candidate["macs"] <= 60_000_000
        assert candidate["costs_match_program"] and len(candidate["blocks"]) == 4
        assert candidate["solve"]["status"] == "optimal" and candidate["solve"]["gap"] == 0.0
    choice = record["choice"]
    assert choice["blocks"] == ",".join(record["candidates"][0]["blocks"])
    assert len(parse_blocks(choice["blocks"])) == 4  # what `reassembly stitch --blocks` reads
    assert "choice:" in proc.stdout and "gap 0.00%" in proc.stdout


def test_an_impossible_budget_is_a_one_line_error_with_the_smallest_cost(tmp_path):
    proc = run("search", str(PARTITION.parent), "--data", "digits", "--params", "10K", "--threads", "1", "--out",
               str(tmp_path / "s.json"), check_ok=False)
    assert_one_line_error(proc, "--params", "smallest network", "148.51K parameters")
    assert not (tmp_path / "s.json").exists()


def test_search_command_argument_errors_are_one_line(tmp_path):
    proc = run("search", str(PARTITION.parent), "--data", "digits", "--params", "half", check_ok=False)
    assert_one_line_error(proc, "--params", "0.5M")
    proc = run("search", str(tmp_path), "--data", "digits", check_ok=False)
    assert_one_line_error(proc, "partition.json", "reassembly partition")
    proc = run("search", str(PARTITION.parent), "--data", "digits", "--proxy", "nope", check_ok=False)
    assert_one_line_error(proc, "unknown proxy", "naswot")


def test_search_help_teaches():
    help_text = run("search", "--help").stdout
    assert "Usage:" in help_text and "--min-params" in help_text and "stitch --blocks" in help_text


def test_the_size_baseline_needs_no_re_ranking(tmp_path):
    """With the params proxy the program's objective is the network's parameter count, so the assembled networks
    come back in the program's order with scores equal to their objectives."""
    from reassembly.search import search_stage

    record = search_stage(PARTITION.parent, "digits", Budget.parse(params="0.4M"), proxy="params", top_k=4,
                          out=tmp_path / "s.json")
    assert [c["program_rank"] for c in record["candidates"]] == [1, 2, 3, 4]
    assert all(c["proxy"] == c["program_objective"] == c["params"] for c in record["candidates"])
    assert record["candidates"][0]["params"] <= 400_000
    assert np.all(np.diff([c["params"] for c in record["candidates"]]) <= 0)


def test_a_latency_budget_is_measured_per_part_and_again_after_assembly(tmp_path):
    from reassembly.search import search_stage

    record = search_stage(PARTITION.parent, "digits", Budget.parse(params="0.5M", latency="1s"), proxy="params",
                          top_k=2, latency_repeats=2, out=tmp_path / "s.json")
    assert record["budget"]["latency"] == {"min": None, "max": 1000.0}
    for candidate in record["candidates"]:
        assert candidate["latency_ms"] > 0 and candidate["latency_ms_predicted"] > 0
        assert candidate["within_budget"]
    assert record["choice"]["rank"] == 1
