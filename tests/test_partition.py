"""Cover-set partition on synthetic point-CKA matrices: block similarity, feasibility, determinism, recovery of
planted structure, and the official code's bugs that must stay fixed (donor-side cap, global-best stall counting)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from reassembly.errors import ReassemblyError
from reassembly.partition import ModelNodes, Partition, PartitionError, block_similarity, partition
from reassembly.partition.cover import _Sampler


def chain_model(name: str, body: int, params=None, stem: int = 1, head: int = 1) -> ModelNodes:
    """A chain of ``stem + body + head`` nodes whose body is the middle ``body`` nodes."""
    length = stem + body + head
    params = tuple(params) if params is not None else (10,) * length
    return ModelNodes(name, (stem, stem + body), params, tuple(f"{name}.n{i}" for i in range(length)))


def all_pairs(models, matrix_of) -> dict:
    return {(a.name, b.name): matrix_of(a, b) for a, b in itertools.combinations(models, 2)}


def random_points(models, rng) -> dict:
    return all_pairs(models, lambda a, b: rng.uniform(-0.1, 1.0, (a.points, b.points)))


def depth_points(models, depth: dict, scale: float) -> dict:
    """CKA that decays with the distance between the points' latent depths."""
    return all_pairs(models, lambda a, b: np.exp(-np.abs(depth[a.name][:, None] - depth[b.name][None, :]) / scale))


def within_set_score(result: Partition, points, mode: str) -> float:
    total = 0.0
    for members in result.sets:
        for (a, i), (b, j) in itertools.combinations(members.members, 2):
            total += block_similarity(points, a, result.blocks[a][i], b, result.blocks[b][j], mode)
    return total


# ---------------------------------------------------------------------------------------------------------------------
def test_block_similarity_modes_orientation_and_same_model():
    c = np.arange(20, dtype=float).reshape(4, 5) / 20  # model a: 3 nodes (4 points), model b: 4 nodes (5 points)
    points = {("a", "b"): c}
    assert block_similarity(points, "a", (1, 3), "b", (2, 4)) == pytest.approx(c[1, 2] + c[3, 4])
    assert block_similarity(points, "a", (1, 3), "b", (2, 4), "first_last") == pytest.approx(c[2, 3] + c[3, 4])
    # the other orientation reads the transpose
    assert block_similarity(points, "b", (2, 4), "a", (1, 3)) == pytest.approx(c[1, 2] + c[3, 4])
    assert block_similarity(points, "b", (0, 1), "a", (2, 3), "first_last") == pytest.approx(c[3, 1] + c[3, 1])
    # blocks of one model: 0 unless the same block (2), whatever the stage index (the official typo is not copied)
    assert block_similarity(points, "a", (0, 1), "a", (1, 3)) == 0.0
    assert block_similarity(points, "a", (0, 2), "a", (1, 3)) == 0.0
    assert block_similarity(points, "a", (1, 3), "a", (1, 3)) == 2.0
    with pytest.raises(PartitionError, match="model b"):
        block_similarity(points, "a", (0, 1), "b", (2, 5))
    with pytest.raises(PartitionError, match="unknown similarity 'last'"):
        block_similarity(points, "a", (0, 1), "b", (2, 3), "last")


@pytest.mark.parametrize("size", ["nodes", "params"])
@pytest.mark.parametrize("stage_aligned", [True, False])
def test_blocks_cover_each_body_within_the_cap(size, stage_aligned):
    rng = np.random.default_rng(7)
    for k, eps in [(1, 0.0), (2, 0.0), (3, 0.1), (4, 0.2), (5, 1.0)]:
        models = []
        for index in range(4):
            body = int(rng.integers(k, 14))
            params = rng.integers(1, 1000, body + 2)
            if index == 0 and body > 1:
                params[2] = 50_000  # one node larger than any equal share: the parameter cap must be raised
            models.append(chain_model(f"m{index}", body, params.tolist()))
        points = random_points(models, rng)
        result = partition(models, points, k, eps, size=size, stage_aligned=stage_aligned, restarts=5, seed=k)
        for model in models:
            blocks = result.blocks[model.name]
            assert len(blocks) == k
            assert blocks[0][0] == model.body[0] and blocks[-1][1] == model.body[1]
            assert all(stop == start for (_, stop), (start, _) in zip(blocks[:-1], blocks[1:]))
            assert all(start < stop for start, stop in blocks)
            sizes = [stop - start if size == "nodes" else sum(model.node_params[start:stop]) for start, stop in blocks]
            assert list(result.block_params[model.name]) == [sum(model.node_params[a:b]) for a, b in blocks]
            body_size = sum(1 if size == "nodes" else model.node_params[i] for i in range(*model.body))
            nominal = math.ceil(round((1 + eps) * body_size / k, 9)) if size == "nodes" else \
                math.floor((1 + eps) * body_size / k + 1e-9)
            cap = result.caps[model.name]
            assert max(sizes) <= cap
            if model.name in result.raised_caps:
                assert size == "params" and cap > nominal
                assert cap == smallest_feasible_cap(model, k)  # brute force over every cut configuration
            else:
                assert cap == nominal
        members = sorted(member for members in result.sets for member in members.members)
        assert members == sorted((model.name, stage) for model in models for stage in range(k))
        assert all(members.anchor in members.members for members in result.sets)
        if stage_aligned:
            for stage, members in enumerate(result.sets):
                assert members.members == tuple((model.name, stage) for model in models)
        assert result.score == pytest.approx(within_set_score(result, points, "io"))


def smallest_feasible_cap(model: ModelNodes, k: int) -> int:
    first, stop = model.body
    best = None
    for cuts in itertools.combinations(range(first + 1, stop), k - 1):
        bounds = [first, *cuts, stop]
        worst = max(sum(model.node_params[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_the_eps_share_is_not_spoiled_by_float_rounding():
    # (1 + 0.2) * 10 / 4 is 3.0000000000000004 in floats; the cap is 3 nodes, not 4
    models = [chain_model("a", 10), chain_model("b", 10)]
    result = partition(models, random_points(models, np.random.default_rng(0)), 4, 0.2, restarts=3)
    assert result.caps == {"a": 3, "b": 3}
    assert all(stop - start <= 3 for blocks in result.blocks.values() for start, stop in blocks)


def test_initial_cuts_are_uniform_among_feasible_ones():
    prefix = np.arange(8)  # 7 unit-size nodes, 3 blocks of at most 3 nodes
    feasible = [c for c in itertools.combinations(range(1, 7), 2)
                if max(np.diff([0, *c, 7])) <= 3]
    sampler = _Sampler(prefix, 3, 3)
    assert sampler.counts[3][0] == len(feasible)
    rng = np.random.default_rng(0)
    draws = [tuple(sampler.draw(rng)[1:-1]) for _ in range(4000)]
    assert set(draws) == set(feasible)
    expected = len(draws) / len(feasible)
    counts = np.array([draws.count(c) for c in feasible])
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))


def test_same_seed_same_partition():
    rng = np.random.default_rng(3)
    models = [chain_model(f"m{i}", int(rng.integers(6, 12))) for i in range(4)]
    points = random_points(models, rng)
    for stage_aligned in (True, False):
        first = partition(models, points, 3, 0.3, stage_aligned=stage_aligned, restarts=8, seed=11)
        again = partition(models, points, 3, 0.3, stage_aligned=stage_aligned, restarts=8, seed=11)
        other = partition(models, points, 3, 0.3, stage_aligned=stage_aligned, restarts=8, seed=12)
        assert json.dumps(first.to_dict()) == json.dumps(again.to_dict())
        assert first.restart_scores != other.restart_scores  # another seed draws other starting points


@pytest.mark.parametrize("copies", [2, 3, 5, 8])
def test_identical_copies_partition_identically(copies):
    nodes = 14  # stem + 12 body + head
    smooth = np.exp(-np.abs(np.arange(nodes + 1)[:, None] - np.arange(nodes + 1)[None, :]) / 2)
    models = [chain_model(f"copy{i}", nodes - 2) for i in range(copies)]
    points = all_pairs(models, lambda a, b: smooth)
    for stage_aligned in (True, False) if copies <= 3 else (True,):
        result = partition(models, points, 4, 0.2, stage_aligned=stage_aligned, restarts=10)
        assert len(set(result.blocks.values())) == 1, result.blocks
        assert result.score == pytest.approx(4 * 2 * copies * (copies - 1) / 2)  # every pair scores 1 + 1
        assert sorted(len(members.members) for members in result.sets) == [copies] * 4


# planted boundaries (body-relative) of three models of different lengths
PLANTED = {"a": (9, (2, 5, 7)), "b": (12, (3, 6, 10)), "c": (7, (2, 4, 5))}


def planted_zoo():
    """CKA is 1 exactly where the planted boundaries of two models meet (latent depths 0, 1/4, ..., 1) and decays
    quickly elsewhere; points between boundaries get jittered depths so that no other cut lines up."""
    rng = np.random.default_rng(0)
    models, depth = [], {}
    for name, (length, cuts) in PLANTED.items():
        models.append(chain_model(name, length))
        bounds = [0, *cuts, length]
        body = np.empty(length + 1)
        for stage, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            inner = np.sort(rng.uniform(0.1, 0.9, hi - lo - 1))
            body[lo : hi + 1] = np.concatenate([[stage], stage + inner, [stage + 1]]) / 4
        depth[name] = np.concatenate([[-0.3], body, [1.3]])  # model input before the stem, output after the head
    return models, depth_points(models, depth, 0.05)


@pytest.mark.parametrize("stage_aligned", [True, False])
def test_planted_boundaries_are_recovered(stage_aligned):
    models, points = planted_zoo()
    result = partition(models, points, 4, 0.5, stage_aligned=stage_aligned, restarts=30)
    for model in models:
        length, cuts = PLANTED[model.name]
        bounds = [1 + c for c in (0, *cuts, length)]  # chain indices: one stem node first
        assert result.blocks[model.name] == tuple(zip(bounds[:-1], bounds[1:]))
    # matching blocks share a set (in general mode too, where nothing forces it)
    assert [set(members.members) for members in result.sets] == [
        {(model.name, stage) for model in models} for stage in range(4)
    ]
    assert result.score == pytest.approx(4 * 3 * 2)


def test_a_random_partition_is_one_feasible_unrefined_draw():
    """iterations=0, restarts=1: DeRy's random-partition baseline. Feasible, stage-aligned, scored by the same
    within-set similarity, below the search's partition, and another seed draws other cuts."""
    models, points = planted_zoo()
    searched = partition(models, points, 4, 0.5, restarts=30)
    draws = [partition(models, points, 4, 0.5, restarts=1, iterations=0, seed=seed) for seed in range(6)]
    for result in draws:
        assert result.iterations == 0 and result.restart_iterations == (0,)
        for model in models:
            blocks = result.blocks[model.name]
            assert blocks[0][0] == model.body[0] and blocks[-1][1] == model.body[1]
            assert all(a < b and b == c for (a, b), (c, _) in zip(blocks, blocks[1:] + ((blocks[-1][1], 0),)))
            assert max(b - a for a, b in blocks) <= result.caps[model.name]
        assert [set(members.members) for members in result.sets] == [
            {(model.name, stage) for model in models} for stage in range(4)
        ]
        assert result.score == pytest.approx(within_set_score(result, points, "io"))
        assert result.score < searched.score
    assert len({tuple(sorted(result.blocks.items())) for result in draws}) > 1


def test_the_cap_is_checked_on_the_receiving_block():
    """Similarity pulls both boundaries towards body position 7 of 8: every forward move improves the score and the
    donor always keeps more than one node, so the official donor-side check would grow block 0 to 7 nodes."""
    for size in ("nodes", "params"):
        models = [chain_model("a", 8), chain_model("b", 8)]
        pull = np.exp(-np.abs(np.arange(11) - 1 - 7) / 2)  # chain point p is body position p - 1
        points = all_pairs(models, lambda a, b: pull[:, None] * pull[None, :])
        result = partition(models, points, 2, 0.25, size=size, restarts=10)  # cap: 5 nodes, 50 params
        assert result.caps == ({"a": 5, "b": 5} if size == "nodes" else {"a": 50, "b": 50})
        assert result.blocks == {"a": ((1, 6), (6, 9)), "b": ((1, 6), (6, 9))}


def test_stalls_are_counted_per_restart():
    """Every restart walks its boundary one node per iteration towards the optimum, improving each time. Counting
    stalls against the global best (the official code) would stop every later restart after patience + 1
    iterations, well short of the optimum, because its score stays below the first restart's best. (Three models:
    with two, both anchors can sit in one model, whose boundary then never feels a pull, as in the official code.)"""
    models = [chain_model(name, 40) for name in "abc"]
    pull = np.exp(-np.abs(np.arange(43) - 1 - 38) / 10)
    points = all_pairs(models, lambda a, b: pull[:, None] * pull[None, :])
    result = partition(models, points, 2, 1.0, restarts=6, iterations=100, patience=2)
    assert min(result.restart_iterations[1:]) > 2 + 1
    assert result.restart_scores == pytest.approx([result.score] * 6)
    assert result.blocks["a"] == ((1, 39), (39, 41))


def test_iterations_bound_each_restart():
    models = [chain_model("a", 40), chain_model("b", 40)]
    pull = np.exp(-np.abs(np.arange(43) - 1 - 38) / 10)
    points = all_pairs(models, lambda a, b: pull[:, None] * pull[None, :])
    result = partition(models, points, 2, 1.0, restarts=4, iterations=3, patience=2)
    assert max(result.restart_iterations) <= 3


@pytest.mark.parametrize("stage_aligned", [True, False])
def test_round_trip_through_json(stage_aligned):
    rng = np.random.default_rng(5)
    models = [chain_model(f"m{i}", 9, rng.integers(1, 100, 11).tolist()) for i in range(3)]
    result = partition(models, random_points(models, rng), 3, 0.2, size="params", stage_aligned=stage_aligned,
                       similarity="first_last", restarts=4)
    record = json.loads(json.dumps(result.to_dict()))
    assert Partition.from_dict(record) == result
    assert record["config"]["similarity"] == "first_last" and record["config"]["size"] == "params"
    block = record["models"][0]["blocks"][0]
    assert set(block) == {"start", "stop", "params", "set"}
    block["macs"] = 123  # the caller's per-block metadata does not disturb reading back
    assert Partition.from_dict(record) == result
    assert result.set_index("m1", 2) == record["models"][1]["blocks"][2]["set"]
    with pytest.raises(PartitionError, match="not a partition record"):
        Partition.from_dict({"config": {}})


def test_single_model_and_single_block():
    model = chain_model("only", 6)
    result = partition([model], {}, 3, 0.0, restarts=2)
    assert [stop - start for start, stop in result.blocks["only"]] == [2, 2, 2] and result.score == 0.0
    models = [chain_model("a", 4), chain_model("b", 5)]
    whole = partition(models, random_points(models, np.random.default_rng(0)), 1, 0.0, restarts=2)
    assert whole.blocks == {"a": ((1, 5),), "b": ((1, 6),)}


def test_errors_name_the_culprit():
    rng = np.random.default_rng(0)
    a, b, short = chain_model("a", 6), chain_model("b", 7), chain_model("tiny", 2)
    good = random_points([a, b], rng)

    def fails(match: str, *args, **kwargs):
        with pytest.raises(PartitionError, match=match) as caught:
            partition(*args, **kwargs)
        assert isinstance(caught.value, ReassemblyError) and "\n" not in str(caught.value)

    fails("k must be an integer of at least 1", [a, b], good, 0)
    fails(r"model tiny has only 2 body nodes; use --k 2 or fewer", [a, short],
          random_points([a, short], rng), 3)
    fails("eps must be a finite number >= 0", [a, b], good, 2, -0.1)
    fails("no models to partition", [], {}, 2)
    fails("model name 'a' appears more than once", [a, chain_model("a", 5)], good, 2)
    fails("unknown size 'flops'", [a, b], good, 2, size="flops")
    fails("unknown similarity 'cka'", [a, b], good, 2, similarity="cka")
    fails("restarts must be an integer of at least 1", [a, b], good, 2, restarts=0)
    fails("iterations must be an integer of at least 0", [a, b], good, 2, iterations=-1)
    fails("no similarity between models a and c", [a, b, chain_model("c", 5)], good, 2)
    fails(r"between models a and b \(points\[\('a', 'b'\)\]\) has shape \(9, 9\), expected \(9, 10\)",
          [a, b], {("a", "b"): np.zeros((9, 9))}, 2)
    fails(r"between models a and b \(points\[\('b', 'a'\)\]\) has shape \(9, 9\), expected \(10, 9\)",
          [a, b], {("b", "a"): np.zeros((9, 9))}, 2)
    nan = np.zeros((9, 10))
    nan[3, 4] = np.nan
    fails(r"models a and b .* non-finite value \(NaN or inf\) at points \(3, 4\)", [a, b], {("a", "b"): nan}, 2)
    fails("model bad has body", [ModelNodes("bad", (1, 9), (1,) * 5), b], good, 2)


def test_the_transpose_serves_the_other_orientation():
    rng = np.random.default_rng(9)
    models = [chain_model("a", 6), chain_model("b", 8)]
    points = random_points(models, rng)
    flipped = {("b", "a"): points["a", "b"].T}
    assert partition(models, points, 3, restarts=3).to_dict() == partition(models, flipped, 3, restarts=3).to_dict()


def test_general_mode_scores_match_block_similarity():
    rng = np.random.default_rng(4)
    models = [chain_model(f"m{i}", int(rng.integers(5, 10))) for i in range(4)]
    points = random_points(models, rng)
    for mode in ("io", "first_last"):
        result = partition(models, points, 3, 0.5, stage_aligned=False, similarity=mode, restarts=5)
        assert result.score == pytest.approx(within_set_score(result, points, mode))
        assert result.score == max(result.restart_scores) == result.restart_scores[result.best_restart]
