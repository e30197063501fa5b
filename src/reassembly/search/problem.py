"""The block-selection problem as plain arrays, its exact evaluation, brute force, and random instances.

A network takes one block at each of K *positions* in stage order (position k holds blocks that were the k-th block
of their model) and uses every equivalence set exactly once (with stage-aligned sets, set k *is* position k, so this
adds nothing). Between the blocks at positions k and k+1 sits a stitch, whose cost depends on the pair; a pair no
stitch can join, or that a compatibility rule forbids, is not *allowed*. Costs (parameters, MACs, latency) are
additive: every candidate has a unary cost (its block, plus the stem when it is at the first position and the head
when at the last, since both depend on that one block only) and every allowed pair a pair cost (its stitch). The
objective to maximise is likewise a unary term per candidate plus an optional pair term.

:func:`brute_force` enumerates every combination, which is what the 0-1 program (:mod:`.program`) must agree with;
:func:`random_problem` makes synthetic instances for tests and benchmarks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .budget import RESOURCES, Budget


@dataclass
class Problem:
    """One instance. Per position ``k``: ``labels[k]`` (candidate names), ``sets[k]`` (equivalence set of each),
    ``usable[k]`` (may be chosen at all), ``term[k]`` (objective term). Per transition ``k -> k+1``:
    ``allowed[k]`` (bool matrix n_k x n_{k+1}) and ``pair_term[k]`` (objective, optional). ``unary[r][k]`` and
    ``pair[r][k]`` hold the costs of resource ``r``. ``reasons[(k, a, b)]`` says why a pair is not allowed and
    ``unusable[(k, a)]`` why a candidate cannot be chosen (for reports)."""

    labels: list[list[str]]
    sets: list[np.ndarray]
    term: list[np.ndarray]
    allowed: list[np.ndarray]
    unary: dict[str, list[np.ndarray]]
    pair: dict[str, list[np.ndarray]]
    usable: list[np.ndarray] | None = None
    pair_term: list[np.ndarray] | None = None
    reasons: dict[tuple[int, int, int], str] = field(default_factory=dict)
    unusable: dict[tuple[int, int], str] = field(default_factory=dict)

    def __post_init__(self):
        k = len(self.labels)
        if k < 1:
            raise ValueError("a problem needs at least one position")
        self.sets = [np.asarray(s, dtype=np.int64) for s in self.sets]
        self.term = [np.asarray(t, dtype=np.float64) for t in self.term]
        self.allowed = [np.asarray(a, dtype=bool) for a in self.allowed]
        if self.usable is None:
            self.usable = [np.ones(len(names), dtype=bool) for names in self.labels]
        self.usable = [np.asarray(u, dtype=bool) for u in self.usable]
        sizes = self.sizes
        if len(self.allowed) != k - 1:
            raise ValueError(f"{k} positions need {k - 1} allowed-pair matrices, got {len(self.allowed)}")
        for j, matrix in enumerate(self.allowed):
            if matrix.shape != (sizes[j], sizes[j + 1]):
                raise ValueError(f"allowed[{j}] has shape {matrix.shape}, expected {(sizes[j], sizes[j + 1])}")
        for name, per in (("sets", self.sets), ("term", self.term), ("usable", self.usable)):
            if [len(v) for v in per] != sizes:
                raise ValueError(f"{name} does not have one entry per candidate")
        for resource in self.resources:
            self.unary[resource] = [np.asarray(v, dtype=np.float64) for v in self.unary[resource]]
            self.pair[resource] = [np.asarray(v, dtype=np.float64) for v in self.pair[resource]]
        if self.pair_term is not None:
            self.pair_term = [np.asarray(v, dtype=np.float64) for v in self.pair_term]

    @property
    def positions(self) -> int:
        return len(self.labels)

    @property
    def sizes(self) -> list[int]:
        return [len(names) for names in self.labels]

    @property
    def resources(self) -> tuple[str, ...]:
        return tuple(r for r in RESOURCES if r in self.unary)

    @property
    def space(self) -> int:
        """Number of combinations of one candidate per position (compatible or not)."""
        return math.prod(self.sizes)

    @property
    def set_ids(self) -> list[int]:
        return sorted({int(s) for per in self.sets for s in per})

    def compatible(self, choice: tuple[int, ...]) -> bool:
        """Whether ``choice`` (a candidate index per position) can be assembled: every candidate usable, every
        pair allowed, every equivalence set used exactly once."""
        if len(choice) != self.positions:
            return False
        if not all(self.usable[k][i] for k, i in enumerate(choice)):
            return False
        if not all(self.allowed[k][a, b] for k, (a, b) in enumerate(itertools.pairwise(choice))):
            return False
        used = sorted(int(self.sets[k][i]) for k, i in enumerate(choice))
        return used == self.set_ids

    def costs(self, choice: tuple[int, ...]) -> dict[str, float]:
        """Every resource's total for ``choice`` (unary plus pair costs)."""
        totals = {}
        for resource in self.resources:
            unary, pair = self.unary[resource], self.pair[resource]
            total = sum(float(unary[k][i]) for k, i in enumerate(choice))
            total += sum(float(pair[k][a, b]) for k, (a, b) in enumerate(itertools.pairwise(choice)))
            totals[resource] = total
        return totals

    def objective(self, choice: tuple[int, ...]) -> float:
        value = sum(float(self.term[k][i]) for k, i in enumerate(choice))
        if self.pair_term is not None:
            value += sum(float(self.pair_term[k][a, b]) for k, (a, b) in enumerate(itertools.pairwise(choice)))
        return value

    def names(self, choice: tuple[int, ...]) -> list[str]:
        return [self.labels[k][i] for k, i in enumerate(choice)]

    def allowed_pairs(self) -> int:
        return int(sum(matrix.sum() for matrix in self.allowed))


def brute_force(problem: Problem, budget: Budget | None = None, top_k: int | None = None,
                limit: int = 5_000_000) -> list[tuple[float, tuple[int, ...]]]:
    """Every compatible choice within ``budget``, best objective first (ties by choice), at most ``top_k``.
    Refuses spaces larger than ``limit`` combinations (it is a reference for tests and tiny zoos)."""
    if problem.space > limit:
        raise ValueError(f"brute force over {problem.space:,} combinations exceeds the limit of {limit:,}")
    budget = budget or Budget()
    found = []
    for choice in itertools.product(*(range(n) for n in problem.sizes)):
        if problem.compatible(choice) and budget.admits(problem.costs(choice)):
            found.append((problem.objective(choice), choice))
    found.sort(key=lambda item: (-item[0], item[1]))
    return found if top_k is None else found[:top_k]


def feasible_networks(problem: Problem, budget: Budget | None = None, limit: int | None = None
                      ) -> list[tuple[int, ...]] | None:
    """Every compatible choice within ``budget``, in lexicographic order of the choice, or ``None`` as soon as
    there are more than ``limit``. A depth-first walk over the pruned problem (:func:`prune`) that stops a prefix
    once a bounded maximum is passed (every cost is non-negative), so its time grows with the feasible networks,
    not with the space. The search scores every one of them when they are few enough."""
    budget = budget or Budget()
    pruned = prune(problem, budget) if budget.resources else problem
    maxima = {r: budget.bounds(r)[1] for r in budget.resources if r in problem.unary and budget.bounds(r)[1] is not None}
    needed = problem.set_ids
    found: list[tuple[int, ...]] = []

    def extend(prefix: list[int], costs: dict[str, float], used: frozenset[int]) -> bool:
        k = len(prefix)
        if k == problem.positions:
            if sorted(used) == needed and budget.admits(costs):
                found.append(tuple(prefix))
            return limit is None or len(found) <= limit
        for i in np.flatnonzero(pruned.usable[k]):
            i = int(i)
            if k and not pruned.allowed[k - 1][prefix[-1], i]:
                continue
            owner = int(problem.sets[k][i])
            if owner in used:
                continue
            step = {r: costs[r] + float(problem.unary[r][k][i])
                    + (float(problem.pair[r][k - 1][prefix[-1], i]) if k else 0.0) for r in costs}
            if any(step[r] > high * (1 + 1e-9) for r, high in maxima.items()):
                continue
            if not extend([*prefix, i], step, used | {owner}):
                return False
        return True

    complete = extend([], {r: 0.0 for r in problem.resources}, frozenset())
    return found if complete else None


def random_problem(models: int = 8, positions: int = 4, seed: int = 0, forbid: float = 0.25,
                   stage_aligned: bool = True, pair_terms: bool = False, latency: bool = False) -> Problem:
    """A synthetic zoo: ``models`` models cut into ``positions`` blocks each. Block sizes vary over two orders of
    magnitude; consecutive blocks of one model join for free (no stitch); other pairs pay a stitch that grows with
    both blocks' widths, and a fraction ``forbid`` of them is not allowed. With ``stage_aligned=False`` each model's
    blocks fall in a random permutation of the sets, as general clustering can give."""
    rng = np.random.default_rng(seed)
    width = rng.integers(8, 512, size=(models, positions + 1)).astype(np.float64)  # width at every block boundary
    params = rng.lognormal(11.0, 1.2, size=(models, positions)).round()
    macs = rng.lognormal(16.0, 1.0, size=(models, positions)).round()
    millis = rng.lognormal(-1.0, 0.5, size=(models, positions))
    stem = 27 * width[:, 0] + 2 * width[:, 0]  # a 3x3 conv from 3 channels and its norm
    head = 5 * width[:, positions] + 5  # a 5-class linear head
    unary = {"params": [params[:, k].copy() for k in range(positions)],
             "macs": [macs[:, k].copy() for k in range(positions)]}
    unary["params"][0] += stem
    unary["params"][-1] += head
    unary["macs"][0] += stem * 1024
    unary["macs"][-1] += head
    if latency:
        unary["latency"] = [millis[:, k].copy() for k in range(positions)]
    pair: dict[str, list[np.ndarray]] = {r: [] for r in unary}
    allowed, pair_term = [], []
    same = np.eye(models, dtype=bool)
    for k in range(positions - 1):
        stitch = np.outer(width[:, k + 1], width[:, k + 1]) + 3 * width[:, k + 1][None, :]
        stitch = np.where(same, 0.0, stitch)
        pair["params"].append(stitch)
        pair["macs"].append(stitch * rng.choice([16, 64, 256], size=(models, 1)))
        if latency:
            pair["latency"].append(np.where(same, 0.0, 0.01 + stitch / 1e6))
        allowed.append(same | (rng.random((models, models)) >= forbid))
        pair_term.append(rng.normal(0, 0.2, size=(models, models)))
    if stage_aligned:
        sets = [np.full(models, k) for k in range(positions)]
    else:
        order = np.array([rng.permutation(positions) for _ in range(models)])
        sets = [order[:, k] for k in range(positions)]
    usable = [np.ones(models, dtype=bool) for _ in range(positions)]
    usable[0] = rng.random(models) >= forbid / 2  # some blocks cannot come first (e.g. token blocks under DeRy's rule)
    usable[0][0] = True
    return Problem(
        labels=[[f"m{m}:{k}" for m in range(models)] for k in range(positions)],
        sets=sets,
        term=[rng.normal(0, 1, size=models) for _ in range(positions)],
        allowed=allowed,
        unary=unary,
        pair=pair,
        usable=usable,
        pair_term=pair_term if pair_terms else None,
    )


def prune(problem: Problem, budget: Budget, rounds: int = 3) -> Problem:
    """The problem without the pairs and candidates that no network within ``budget`` can use.

    For every bounded resource, the cheapest way to reach each candidate from the first position (forward) and to
    finish from it (backward) is a dynamic program over the positions; a pair whose cheapest completion is above the
    maximum, or whose dearest completion is below the minimum, is dropped. The equivalence-set constraint is ignored
    here, so these are relaxations: nothing that a feasible network uses is ever dropped."""
    allowed = [matrix.copy() for matrix in problem.allowed]
    usable = [mask.copy() for mask in problem.usable]
    for _ in range(rounds):
        changed = False
        for resource in budget.resources:
            if resource not in problem.unary:
                continue
            low, high = budget.bounds(resource)
            unary, pair = problem.unary[resource], problem.pair[resource]
            for bound, sign in ((high, 1.0), (low, -1.0)):
                if bound is None:
                    continue
                # minimise sign * cost: the cheapest completions for a maximum, the dearest for a minimum
                forward = [np.where(usable[0], sign * unary[0], np.inf)]
                for k in range(problem.positions - 1):
                    step = np.where(allowed[k], forward[k][:, None] + sign * pair[k], np.inf).min(axis=0)
                    forward.append(np.where(usable[k + 1], step + sign * unary[k + 1], np.inf))
                backward = [np.where(usable[-1], sign * unary[-1], np.inf)]
                for k in range(problem.positions - 2, -1, -1):
                    step = np.where(allowed[k], sign * pair[k] + backward[0][None, :], np.inf).min(axis=1)
                    backward.insert(0, np.where(usable[k], step + sign * unary[k], np.inf))
                limit = sign * bound + 1e-9 * max(1.0, abs(bound))
                for k in range(problem.positions - 1):
                    through = forward[k][:, None] + sign * pair[k] + backward[k + 1][None, :]
                    keep = allowed[k] & (through <= limit)
                    changed |= bool((keep != allowed[k]).any())
                    allowed[k] = keep
                for k in range(problem.positions):
                    keep = usable[k] & (forward[k] + backward[k] - sign * unary[k] <= limit)
                    changed |= bool((keep != usable[k]).any())
                    usable[k] = keep
        if not changed:
            break
    return Problem(problem.labels, problem.sets, problem.term, allowed, problem.unary, problem.pair, usable,
                   problem.pair_term, problem.reasons, problem.unusable)
