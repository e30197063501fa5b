"""Reassembly search: budgets, the exact 0-1 program against brute force, top-k enumeration, infeasible budgets, the
search space of the shipped partition (compatibility rules, exact costs), the proxies, and the CLI."""

import json
import math
import random

import numpy as np
import pytest
import torch

import reassembly
from reassembly.measure import count_macs, count_params
from reassembly.search import (
    Budget,
    BudgetError,
    ProxyError,
    brute_force,
    build_space,
    enumerate_top,
    feasible_networks,
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
from reassembly.search.proxies.common import PartTracker
from reassembly.search.proxies.naswot import code_kernels, official_hooked
from reassembly.search.proxies.transfer import knn_accuracy, logme_score
from reassembly.search.space import own_model_choice
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


@pytest.mark.parametrize("seed", range(4))
def test_feasible_networks_are_every_compatible_network_within_the_budget(seed):
    problem = random_problem(models=6, positions=4, seed=seed, stage_aligned=seed % 2 == 0)
    budget = _budget_at(problem, 0.3, minimum="macs") if seed == 3 else _budget_at(problem, 0.3)
    reference = sorted(choice for _, choice in brute_force(problem, budget))
    assert reference and feasible_networks(problem, budget) == reference
    assert feasible_networks(problem, budget, limit=len(reference)) == reference
    assert feasible_networks(problem, budget, limit=len(reference) - 1) is None  # too many: the program ranks them


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


def test_own_stems_make_every_zoo_model_exactly_a_candidate(zoo, spaces):
    """A first block may keep its model's stem: the model's own blocks in order are then the model itself with a new
    head. With the zoo model's classifier copied into that head the network gives the zoo model's logits."""
    _, sources = zoo
    space = spaces["dery"]
    choice = own_model_choice(space, "resnet20_cifar5")
    assert space.specs(choice) == ["resnet20_cifar5:0-4", "resnet20_cifar5:4-6", "resnet20_cifar5:6-9",
                                   "resnet20_cifar5:9-10"]
    assert space.problem.compatible(choice)
    model = sources["resnet20_cifar5"].model.eval()
    net = build_network(space.source_blocks(choice), num_classes=5).eval()
    assert isinstance(net.stem, torch.nn.Identity) and not any(count_params(s) for s in net.stitches)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    net.head.fc.load_state_dict(classifier.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)
    assert space.problem.costs(choice)["params"] == count_params(net) == count_params(model)
    # the variant keeps the block's set; without own stems there is none
    variant = next(c for c in space.candidates[0] if c.spec == "resnet20_cifar5:0-4")
    assert variant.set == next(c for c in space.candidates[0] if c.spec == "resnet20_cifar5:1-4").set
    record, _ = zoo
    plain = build_space(record, sources, num_classes=5, own_stems=False)
    assert own_model_choice(plain, "resnet20_cifar5") is None
    assert len(plain.candidates[0]) == len(space.candidates[0]) - len(sources)


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


@pytest.mark.parametrize("name", ["naswot", "naswot_official", "synflow", "jacob_cov", "grad_norm", "params", "macs"])
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


def _naswot_pair(net, images, parts):
    """naswot and naswot_official on one batch: (units recorded, score, block terms of ``parts``) for each."""
    batch = [(images, torch.zeros(len(images), dtype=torch.long))]
    pair = []
    for name, also in (("naswot", None), ("naswot_official", official_hooked)):
        kernel, _ = code_kernels(net.train(), images, PartTracker([]), also)  # K[a, a] = number of units recorded
        proxy = get_proxy(name)
        pair.append((int(kernel[0, 0]), proxy.score(net, batch), proxy.block_terms(net, batch, parts)))
    return pair


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    net = reassembly.create_model("cifar_vit_tiny", num_classes=3, depth=2, dim=32, heads=2, mlp_ratio=2.0)
    return net, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_naswot_official_also_codes_linear_and_attention_outputs_of_a_vit(tiny_vit):
    """The official DeRy code also hooks nn.Linear and attention outputs: per token and block of a ViT, qkv (3d), proj
    (d), the attention module's output (d: the same tensor as proj's, counted again) and both MLP linears (hidden +
    d), plus the head's logits; naswot codes only GELU's hidden units per token and block."""
    net, images = tiny_vit
    depth, dim, hidden, tokens, classes = 2, 32, 64, 65, 3
    (units, score, _), (official_units, official_score, _) = _naswot_pair(net, images, [])
    assert units == depth * tokens * hidden
    assert official_units == units + depth * tokens * (3 * dim + dim + dim + hidden + dim) + classes
    assert math.isfinite(score) and official_score > score + 1.0  # naswot's kernel plus a PSD one: higher


def test_naswot_official_gives_block_terms_like_naswot(tiny_vit):
    """Same PartTracker attribution: every block gains its own linear and attention units; the head, a part that is
    itself hooked, has no activations (naswot: log det(I) = 0) and gets its own logits (its hook runs before the
    tracker's, which would otherwise close the part first)."""
    net, images = tiny_vit
    parts = [*net.blocks, net.head]
    (_, _, terms), (_, _, official_terms) = _naswot_pair(net, images, parts)
    assert len(official_terms) == len(terms) == 3 and all(math.isfinite(t) for t in official_terms)
    assert all(official > plain + 1.0 for official, plain in zip(official_terms[:2], terms[:2], strict=True))
    assert terms[2] == 0.0 < official_terms[2]


def test_naswot_official_adds_only_the_head_to_a_relu_conv_net():
    """A CIFAR ResNet has F.relu activations, no dropout and one nn.Linear, the head: the official hook set adds only
    the head's logits (one unit per class), so the kernels differ by exactly the logits' code kernel, the scores by
    little (3 units next to about 10^5), and the blocks' terms not at all."""
    torch.manual_seed(0)
    net = reassembly.create_model("cifar_resnet20", num_classes=3).train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, _ = code_kernels(net, images, PartTracker([]))
    official, _ = code_kernels(net, images, PartTracker([]), official_hooked)
    with torch.no_grad():
        codes = (net(images) > 0).double()  # the logits' codes
    head = codes @ codes.T + (1 - codes) @ (1 - codes).T  # K_head[a, b]: classes on which a and b agree
    assert torch.equal(official - plain, head) and torch.all(head.diagonal() == 3)
    parts = [net.layer1, net.layer2, net.layer3, net.linear]
    (_, score, terms), (_, official_score, official_terms) = _naswot_pair(net, images, parts)
    assert 0.0 < official_score - score < 1e-2
    assert official_terms[:3] == terms[:3] and terms[3] == 0.0 < official_terms[3]


def test_naswot_official_codes_dropout_outputs():
    """nn.Dropout is hooked too (its train-mode output: the ReLU codes with the dropped units off)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 2))
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    (units, _, _), (official_units, _, _) = _naswot_pair(net, images, [])
    assert units == 4 * 8 * 8 and official_units == 2 * units + 2


def test_logme_is_the_maximised_evidence_of_a_bayesian_linear_model():
    """LogME against a direct maximisation of the marginal likelihood log N(y; 0, F F^T / alpha + I / beta) of each
    one-hot label column, averaged over classes and divided by N; with fewer and with more features than images."""
    from scipy.optimize import minimize

    def direct(features, column):
        f, n = features.numpy(), len(features)

        def negative(log_ab):
            alpha, beta = np.exp(log_ab)
            covariance = f @ f.T / alpha + np.eye(n) / beta
            return 0.5 * (np.linalg.slogdet(covariance)[1] + column @ np.linalg.solve(covariance, column)
                          + n * np.log(2 * np.pi))

        best = minimize(negative, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12,
                                                                             "maxiter": 5000})
        return -best.fun / n

    generator = torch.Generator().manual_seed(0)
    for n, d in ((60, 8), (20, 50)):
        features = torch.randn(n, d, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (n,), generator=generator)
        onehot = torch.nn.functional.one_hot(labels).double().numpy()
        expected = np.mean([direct(features, onehot[:, c]) for c in range(3)])
        assert logme_score(features, labels) == pytest.approx(expected, abs=1e-5)
    informative = torch.nn.functional.one_hot(labels, 5).double() + 0.1 * torch.randn(n, 5, generator=generator)
    assert logme_score(informative, labels) > logme_score(torch.randn(n, 5, generator=generator), labels) + 0.5


def test_knn_accuracy_separates_clusters_and_is_near_chance_on_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    clusters = 5 * torch.nn.functional.one_hot(labels, 4).float() + torch.randn(200, 4, generator=generator)
    assert knn_accuracy(clusters, labels) == 100.0
    assert knn_accuracy(torch.randn(200, 16, generator=generator), labels) < 45


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
               "--top-k", "3", "--max-scored", "0", "--batches", "2", "--batch-size", "16", "--threads", "1",
               "--out", str(out))
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
    assert "choice:" in proc.stdout and "the program's top 3" in proc.stdout


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
                          max_scored=0, out=tmp_path / "s.json")
    assert [c["program_rank"] for c in record["candidates"]] == [1, 2, 3, 4]
    assert all(c["proxy"] == c["program_objective"] == c["params"] for c in record["candidates"])
    assert record["candidates"][0]["params"] <= 400_000
    assert np.all(np.diff([c["params"] for c in record["candidates"]]) <= 0)


def test_a_latency_budget_is_measured_per_part_and_again_after_assembly(tmp_path):
    from reassembly.search import search_stage

    record = search_stage(PARTITION.parent, "digits", Budget.parse(params="0.5M", latency="1s"), proxy="params",
                          top_k=2, max_scored=0, latency_repeats=2, out=tmp_path / "s.json")
    assert record["budget"]["latency"] == {"min": None, "max": 1000.0}
    for candidate in record["candidates"]:
        assert candidate["latency_ms"] > 0 and candidate["latency_ms_predicted"] > 0
        assert candidate["within_budget"]
    assert record["choice"]["rank"] == 1


def test_a_transfer_proxy_search_scores_every_feasible_network_and_ranks_the_zoo_models(tmp_path):
    """14 networks fit 0.27M / 41M parameters and MACs for digits' 10 classes, two of them zoo models with their own
    stems: every one is assembled, fitted and scored (also by LogME and k-NN), the zoo models' ranks are listed, and
    the fast path (prefixes fitted once, scoring images carried along) gives the score of fitting the network alone."""
    from reassembly.search.stage import _TargetImages
    from reassembly.stitch.init import least_squares_init

    out = tmp_path / "search.json"
    proc = run("search", str(PARTITION.parent), "--data", "digits", "--params", "0.27M", "--macs", "41M",
               "--proxy", "fit", "--also", "logme,knn", "--probe-size", "100", "--batches", "4", "--batch-size",
               "16", "--threads", "1", "--out", str(out))
    record = json.loads(out.read_text())
    assert record["selection"]["kind"] == "all" and record["scored"] == 14 == len(record["candidates"])
    zoo = {z["name"]: z for z in record["zoo_models"]}
    assert zoo["resnet20_cifar5"]["rank"] and zoo["resnet20_fashion"]["rank"]
    assert zoo["vgg11_cifar5"]["rank"] is None and zoo["vgg11_cifar5"]["note"] == "over the budget"
    assert f"zoo model resnet20_cifar5 (269.72K, 40.55M MACs): rank {zoo['resnet20_cifar5']['rank']} of 14" \
        in proc.stdout
    scores = [c["proxy"] for c in record["candidates"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    assert all(set(c["scores"]) == {"fit", "logme", "knn"} for c in record["candidates"])
    assert record["choice"]["blocks"] == ",".join(record["candidates"][0]["blocks"])
    # the same network fitted alone on the same probe, scored on the same images
    sources = {name: load_source(name) for name in ("resnet20_cifar5", "resnet20_fashion", "resnet32_cifar5")}
    images = _TargetImages("digits", sources, None, None, True, 100, 4, 16, 0)
    for candidate in record["candidates"]:
        blocks = [sources[name].source_block(*map(int, span.split("-")))
                  for name, span in (spec.split(":") for spec in candidate["blocks"])]
        torch.manual_seed(0)
        net = build_network(blocks, num_classes=10)
        least_squares_init(net, blocks, images.probe[(3, 32, 32)].images, images.probe[(3, 32, 32)].labels,
                           progress=False)
        batches = normalised(images.raw[(3, 32, 32)], net.input_normalization["mean"],
                             net.input_normalization["std"])
        assert get_proxy("fit").score(net, batches) == pytest.approx(candidate["proxy"], abs=1e-9)
        assert get_proxy("logme").score(net, batches) == pytest.approx(candidate["scores"]["logme"], abs=1e-4)
        sources = {name: load_source(name) for name in sources}  # the fit re-estimated their norms
