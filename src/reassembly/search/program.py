"""The exact 0-1 program (``scipy.optimize.milp``, HiGHS) and top-k enumeration with no-good cuts.

Variables: a binary ``x[k, i]`` per candidate ``i`` at position ``k`` (1 = block chosen), and a continuous
``y[k, a, b]`` in [0, 1] per *allowed* pair of candidates at positions k and k+1 (1 = this stitch is used); pairs
that are not allowed have no variable at all, which is how forbidden pairs are excluded. Constraints:

* one block per position, ``sum_i x[k, i] = 1``, and one per equivalence set, ``sum_{i in set j} x = 1``;
* flow between positions: ``sum_b y[k, a, b] = x[k, a]`` and ``sum_a y[k, a, b] = x[k+1, b]``; with ``x`` integral
  the only solution sets ``y[k, a, b] = x[k, a] * x[k+1, b]``, so ``y`` linearises the pair terms exactly without
  being declared integer (this is the network-flow form of the product, tighter than the three-inequality one);
* budgets: ``low <= sum unary cost * x + sum stitch cost * y <= high`` for every bounded resource;
* unusable candidates get an upper bound of 0.

The objective ``sum term * x + sum pair_term * y`` is maximised (scaled by a positive constant so the largest
coefficient is 1). HiGHS is asked for a zero relative gap, so a solution reported optimal is optimal. Before solving,
pairs and candidates that no network within the budget can use are pruned (:func:`~.problem.prune`, exact).

The k best solutions come one by one through no-good cuts: after a solution, "not exactly this combination" (as a
row, ``sum_{x chosen} x <= K - 1``). By default the cut is applied by branching on it (:func:`_partition`), which
keeps every LP relaxation tight; ``method="cuts"`` adds the rows and re-solves the whole program. Each solution's
costs are then recomputed exactly from the problem's arrays; one that only met a budget within the solver's
feasibility tolerance is cut and dropped, so every reported solution meets its budget exactly.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .budget import OPTIONS, Budget, BudgetError, format_amount
from .problem import Problem, prune

PRESOLVE = False  # HiGHS presolve costs more than it saves on these programs (0.4 s of 0.5 s at 50 models)
METHODS = ("partition", "cuts")
BOUND_ATTAINED = "path bound attained"
STOPPED_EMPTY = "time limit reached without a network"
STATUS = {0: "optimal", 1: "limit reached", 2: "infeasible", 3: "unbounded", 4: "solver error"}


@dataclass
class Solution:
    """One enumerated network: a candidate index per position, its names, objective and exact costs, and how the
    solve that found it ended (``gap``: HiGHS's relative optimality gap, 0 when proven optimal)."""

    choice: tuple[int, ...]
    names: list[str]
    objective: float
    costs: dict[str, float]
    status: str
    gap: float
    seconds: float

    def to_dict(self) -> dict:
        return {"blocks": self.names, "objective": self.objective, "costs": self.costs, "status": self.status,
                "gap": self.gap, "seconds": round(self.seconds, 4)}


@dataclass
class Enumeration:
    """The top-k solutions in order, with the program's size and timings."""

    solutions: list[Solution]
    variables: int
    binaries: int
    constraints: int
    seconds: float
    first_seconds: float
    dropped: int = 0  # solutions cut because their exact costs broke a budget by less than the solver's tolerance
    exhausted: bool = False  # fewer than top_k feasible networks exist
    statuses: list[str] = field(default_factory=list)
    unsolved: int = 0  # pieces whose solve stopped at the time limit without a network (the top k may miss some)
    pairs: int = 0  # allowed pairs of the problem
    pairs_kept: int = 0  # of which some network within the budget can use (the rest are pruned before solving)

    @property
    def solves(self) -> int:
        """Calls of the solver (pieces closed by an attained path bound need none)."""
        return sum(status != BOUND_ATTAINED for status in self.statuses)

    @property
    def gap(self) -> float:
        """The largest optimality gap among the solves (0 when every solution was proven optimal)."""
        return max((s.gap for s in self.solutions), default=0.0)

    def to_dict(self) -> dict:
        return {"solver": "scipy.optimize.milp (HiGHS)", "variables": self.variables, "binaries": self.binaries,
                "constraints": self.constraints, "enumerated": len(self.solutions), "exhausted": self.exhausted,
                "status": self.solutions[0].status if self.solutions else "infeasible", "gap": self.gap,
                "solves": self.solves, "pieces_closed_by_bound": len(self.statuses) - self.solves,
                "first_solve_seconds": round(self.first_seconds, 4),
                "seconds": round(self.seconds, 4), "pairs": self.pairs, "pairs_after_budget_pruning": self.pairs_kept,
                "dropped_within_tolerance": self.dropped, "unsolved_at_time_limit": self.unsolved}


class _Program:
    """The constraint matrix of a problem (built once), solved for different objectives, budgets and cuts."""

    def __init__(self, problem: Problem):
        self.problem = problem
        sizes = problem.sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.nx = int(self.offsets[-1])
        pairs = [np.nonzero(matrix) for matrix in problem.allowed]
        self.pairs = pairs
        counts = [len(a) for a, _ in pairs]
        self.pair_offsets = self.nx + np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.pair_offsets[-1])
        rows, cols, vals, lows, highs = [], [], [], [], []
        row = 0

        def add(columns, values, low, high):
            nonlocal row
            rows.extend([row] * len(columns))
            cols.extend(int(c) for c in columns)
            vals.extend(float(v) for v in values)
            lows.append(low)
            highs.append(high)
            row += 1

        for k, n in enumerate(sizes):  # one block per position
            add(range(self.offsets[k], self.offsets[k] + n), [1.0] * n, 1.0, 1.0)
        for set_id in problem.set_ids:  # one block per equivalence set
            members = [self.offsets[k] + i for k in range(problem.positions)
                       for i in np.flatnonzero(problem.sets[k] == set_id)]
            add(members, [1.0] * len(members), 1.0, 1.0)
        for k, (a, b) in enumerate(pairs):  # flow: y out of a = x[a], y into b = x[b]
            ys = self.pair_offsets[k] + np.arange(len(a))
            for i in range(sizes[k]):
                add([*ys[a == i], self.offsets[k] + i], [1.0] * int((a == i).sum()) + [-1.0], 0.0, 0.0)
            for j in range(sizes[k + 1]):
                add([*ys[b == j], self.offsets[k + 1] + j], [1.0] * int((b == j).sum()) + [-1.0], 0.0, 0.0)
        self.base = sparse.csr_array((vals, (rows, cols)), shape=(row, self.n))
        self.base_low, self.base_high = np.array(lows), np.array(highs)
        upper = np.ones(self.n)
        upper[: self.nx] = np.concatenate(problem.usable).astype(float)
        self.bounds = Bounds(np.zeros(self.n), upper)
        self.integrality = np.zeros(self.n)
        self.integrality[: self.nx] = 1

    def vector(self, unary: list[np.ndarray], pair: list[np.ndarray] | None) -> np.ndarray:
        """A coefficient per variable from per-candidate and per-pair values."""
        coefficients = np.zeros(self.n)
        coefficients[: self.nx] = np.concatenate(unary)
        if pair is not None:
            for k, (a, b) in enumerate(self.pairs):
                coefficients[self.pair_offsets[k] : self.pair_offsets[k + 1]] = pair[k][a, b]
        return coefficients

    def cost(self, resource: str) -> np.ndarray:
        return self.vector(self.problem.unary[resource], self.problem.pair[resource])

    def solve(self, objective: np.ndarray, budget: Budget | None, cuts: list[tuple[int, ...]],
              time_limit: float | None, maximise: bool = True):
        """Solve once; returns scipy's result."""
        blocks = [(self.base, self.base_low, self.base_high)]
        for resource in (budget.resources if budget else ()):
            if resource not in self.problem.unary:
                continue
            low, high = budget.bounds(resource)
            blocks.append((sparse.csr_array(self.cost(resource)[None, :]),
                           np.array([-np.inf if low is None else low]), np.array([np.inf if high is None else high])))
        if cuts:
            indices = [(c, self.offsets[k] + i) for c, choice in enumerate(cuts) for k, i in enumerate(choice)]
            rows, cols = zip(*indices)
            matrix = sparse.csr_array((np.ones(len(rows)), (rows, cols)), shape=(len(cuts), self.n))
            blocks.append((matrix, np.full(len(cuts), -np.inf), np.full(len(cuts), self.problem.positions - 1.0)))
        matrix = sparse.vstack([b[0] for b in blocks], format="csr")
        constraint = LinearConstraint(matrix, np.concatenate([b[1] for b in blocks]),
                                      np.concatenate([b[2] for b in blocks]))
        scale = float(np.abs(objective).max()) or 1.0
        options = {"mip_rel_gap": 0.0, "presolve": PRESOLVE}
        if time_limit is not None:
            options["time_limit"] = float(time_limit)
        return milp(-objective / scale if maximise else objective / scale, integrality=self.integrality,
                    bounds=self.bounds, constraints=constraint, options=options)

    def choice(self, x: np.ndarray) -> tuple[int, ...]:
        return tuple(int(np.argmax(x[self.offsets[k] : self.offsets[k + 1]])) for k in range(self.problem.positions))

    @property
    def constraints(self) -> int:
        return self.base.shape[0]


def enumerate_top(problem: Problem, budget: Budget | None = None, top_k: int = 1, time_limit: float | None = None,
                  method: str = "partition") -> Enumeration:
    """The ``top_k`` best compatible networks within ``budget``, best first, by the problem's objective.

    ``method="partition"`` (default) applies each no-good cut by branching on it (see :func:`_partition`);
    ``"cuts"`` adds it as a row and re-solves the whole program. Both are exact; the first keeps every subproblem's
    LP relaxation as tight as the original's and is much faster beyond a few solutions. ``time_limit`` (seconds)
    bounds each solve; a solve stopped by it reports its gap. Raises :class:`BudgetError` naming the smallest
    achievable cost when no network meets the budget."""
    if top_k < 1:
        raise BudgetError(f"top-k must be at least 1, not {top_k}")
    if method not in METHODS:
        raise BudgetError(f"enumeration method must be one of {', '.join(METHODS)}, not {method!r}")
    budget = budget or Budget()
    started = time.perf_counter()
    pruned = prune(problem, budget)
    program = _Program(pruned)
    found = (_partition if method == "partition" else _cuts)(pruned, program, budget, top_k, time_limit)
    solutions, statuses, dropped, exhausted, first = found
    unsolved = statuses.count(STOPPED_EMPTY)
    if not solutions:
        if unsolved:
            raise BudgetError(f"the solver stopped at the time limit ({time_limit} s) before it found a network; "
                              "raise --time-limit or leave it out")
        raise BudgetError(explain_infeasible(problem, budget))
    return Enumeration(solutions, program.n, program.nx, program.constraints, time.perf_counter() - started,
                       first, dropped, exhausted and not unsolved, statuses, unsolved,
                       problem.allowed_pairs(), pruned.allowed_pairs())


def _cuts(problem: Problem, program: _Program, budget: Budget, top_k: int, time_limit: float | None):
    """No-good cuts as rows: after each solution, ``sum of its x <= K - 1`` and solve the whole program again."""
    objective = program.vector(problem.term, problem.pair_term)
    solutions: list[Solution] = []
    cuts: list[tuple[int, ...]] = []
    statuses: list[str] = []
    dropped, exhausted, first = 0, False, None
    while len(solutions) < top_k:
        solve_start = time.perf_counter()
        result = program.solve(objective, budget, cuts, time_limit)
        seconds = time.perf_counter() - solve_start
        first = seconds if first is None else first
        statuses.append(_status(result))
        if result.x is None:
            exhausted = result.status == 2
            break
        choice = program.choice(result.x)
        cuts.append(choice)
        solution = _solution(problem, budget, choice, result, seconds)
        if solution is None:
            dropped += 1
            continue
        solutions.append(solution)
    return solutions, statuses, dropped, exhausted, first or 0.0


def _partition(problem: Problem, program: _Program, budget: Budget, top_k: int, time_limit: float | None):
    """No-good cuts by branching (Lawler and Murty's k-best scheme). "Not the combination t" is the disjunction
    "t_0 excluded at position 0, or t_0 kept and t_1 excluded, or ...". A piece of the search space fixes the blocks
    of the first j positions and excludes some blocks at position j; once the best solution t of a piece is taken,
    the piece splits into the disjoint pieces (same prefix, t_j also excluded) and, for every later position i,
    (prefix + t_j..t_{i-1} fixed, t_i excluded). Each piece is the original program restricted to fewer blocks
    (smaller, with no weakening rows), and the best of all open pieces is the next best overall.

    Pieces are solved lazily: a new piece is first pruned to its budget (:func:`prune`) and bounded by the best
    path through its allowed pairs, ignoring budgets and sets (a dynamic program); it is solved only when that
    bound reaches the top of the queue, and when the bounding path itself is a feasible network, the bound is
    attained and the program need not be called. The whole program (the first piece) is always solved by HiGHS."""
    heap: list = []
    counter = itertools.count()
    statuses: list[str] = []
    timings: list[float] = []

    def restricted(fixed: tuple[int, ...], excluded: frozenset[int]):
        j = len(fixed)
        keep = [np.array([i]) for i in fixed]
        keep.append(np.array([i for i in np.flatnonzero(problem.usable[j]) if i not in excluded], dtype=np.int64))
        keep.extend(np.flatnonzero(problem.usable[i]) for i in range(j + 1, problem.positions))
        if any(len(k) == 0 for k in keep):
            return None
        return prune(restrict(problem, keep), budget), keep

    def solve(fixed, excluded, sub, keep, hint=None) -> None:
        if hint is not None:
            choice = tuple(int(keep[k][i]) for k, i in enumerate(hint))
            if problem.compatible(choice) and budget.admits(problem.costs(choice)):
                statuses.append(BOUND_ATTAINED)
                heapq.heappush(heap, (-problem.objective(choice), next(counter), True,
                                      (choice, fixed, excluded, None, 0.0)))
                return
        piece = _Program(sub)
        solve_start = time.perf_counter()
        result = piece.solve(piece.vector(sub.term, sub.pair_term), budget, [], time_limit)
        seconds = time.perf_counter() - solve_start
        timings.append(seconds)
        statuses.append(_status(result))
        if result.x is not None:
            choice = tuple(int(keep[k][i]) for k, i in enumerate(piece.choice(result.x)))
            heapq.heappush(heap, (-problem.objective(choice), next(counter), True,
                                  (choice, fixed, excluded, result, seconds)))

    def open_piece(fixed: tuple[int, ...], excluded: frozenset[int]) -> None:
        built = restricted(fixed, excluded)
        if built is None:
            return
        sub, keep = built
        bound = best_path(sub)
        if bound is not None:
            heapq.heappush(heap, (-bound[0], next(counter), False, (fixed, excluded, sub, keep, bound[1])))

    root = restricted((), frozenset())
    if root is not None:
        solve((), frozenset(), *root)
    first = timings[0] if timings else 0.0
    solutions: list[Solution] = []
    dropped = 0
    while heap and len(solutions) < top_k:
        _, _, solved, payload = heapq.heappop(heap)
        if not solved:
            solve(*payload)
            continue
        choice, fixed, excluded, result, seconds = payload
        solution = _solution(problem, budget, choice, result, seconds)
        if solution is None:
            dropped += 1
        else:
            solutions.append(solution)
        if len(solutions) == top_k:
            break
        j = len(fixed)
        open_piece(fixed, excluded | {choice[j]})
        for i in range(j + 1, problem.positions):
            open_piece(choice[:i], frozenset({choice[i]}))
    return solutions, statuses, dropped, not heap and len(solutions) < top_k, first


def best_path(problem: Problem) -> tuple[float, tuple[int, ...]] | None:
    """The largest objective over choices whose candidates are usable and whose pairs are allowed (budgets and
    equivalence sets ignored), and one choice that has it: an upper bound for the program."""
    value = np.where(problem.usable[0], problem.term[0], -np.inf)
    back = []
    for k in range(problem.positions - 1):
        through = value[:, None] + (0.0 if problem.pair_term is None else problem.pair_term[k])
        through = np.where(problem.allowed[k], through, -np.inf)
        back.append(through.argmax(axis=0))
        value = np.where(problem.usable[k + 1], through.max(axis=0) + problem.term[k + 1], -np.inf)
    last = int(value.argmax())
    if not np.isfinite(value[last]):
        return None
    choice = [last]
    for k in range(problem.positions - 2, -1, -1):
        choice.insert(0, int(back[k][choice[0]]))
    return float(value[last]), tuple(choice)


def _status(result) -> str:
    if result.x is None and result.status == 1:
        return STOPPED_EMPTY
    return STATUS.get(result.status, "solver error")


def _solution(problem: Problem, budget: Budget, choice: tuple[int, ...], result, seconds: float) -> Solution | None:
    """The solution with exact costs, or ``None`` when it meets the budget only within the solver's tolerance."""
    costs = problem.costs(choice)
    if not (problem.compatible(choice) and budget.admits(costs)):
        return None
    if result is None:  # attained a path bound: optimal for its piece without a solve
        return Solution(choice, problem.names(choice), problem.objective(choice), costs, "optimal", 0.0, seconds)
    gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    return Solution(choice, problem.names(choice), problem.objective(choice), costs,
                    STATUS.get(result.status, "solver error"), max(gap, 0.0), seconds)


def restrict(problem: Problem, keep: list[np.ndarray]) -> Problem:
    """The problem with only the candidates ``keep[k]`` (indices) at each position ``k``."""
    def pairs(matrices):
        return None if matrices is None else [m[np.ix_(keep[k], keep[k + 1])] for k, m in enumerate(matrices)]

    return Problem(
        labels=[[problem.labels[k][i] for i in idx] for k, idx in enumerate(keep)],
        sets=[problem.sets[k][idx] for k, idx in enumerate(keep)],
        term=[problem.term[k][idx] for k, idx in enumerate(keep)],
        allowed=pairs(problem.allowed),
        unary={r: [v[k][idx] for k, idx in enumerate(keep)] for r, v in problem.unary.items()},
        pair={r: pairs(v) for r, v in problem.pair.items()},
        usable=[problem.usable[k][idx] for k, idx in enumerate(keep)],
        pair_term=pairs(problem.pair_term),
    )


def extreme(problem: Problem, resource: str, budget: Budget | None = None, largest: bool = False,
            program: _Program | None = None) -> tuple[float, list[str]] | None:
    """The smallest (or largest) total of ``resource`` over compatible networks within ``budget``, and one network
    that has it; ``None`` when there is none."""
    program = program or _Program(problem)
    result = program.solve(program.cost(resource), budget, [], None, maximise=largest)
    if result.x is None:
        return None
    choice = program.choice(result.x)
    return problem.costs(choice)[resource], problem.names(choice)


def explain_infeasible(problem: Problem, budget: Budget, program: _Program | None = None) -> str:
    """One line saying why no network meets ``budget``, with the smallest (largest) achievable cost."""
    program = program or _Program(problem)
    resources = [r for r in budget.resources if r in problem.unary]
    if extreme(problem, resources[0] if resources else problem.resources[0], None, program=program) is None:
        return ("no network can be assembled from these blocks at all: every combination has a pair no stitch can "
                f"join or that a compatibility rule forbids ({describe_forbidden(problem)})")
    for resource in resources:
        low, high = budget.bounds(resource)
        if high is not None:
            smallest, names = extreme(problem, resource, None, program=program)
            if smallest > high:
                return (f"no network fits {OPTIONS[resource, 'max']} {format_amount(resource, high)}: the smallest "
                        f"network these blocks allow has {format_amount(resource, smallest)} ({', '.join(names)}); "
                        f"raise {OPTIONS[resource, 'max']} to at least that")
        if low is not None:
            largest, names = extreme(problem, resource, None, largest=True, program=program)
            if largest < low:
                return (f"no network reaches {OPTIONS[resource, 'min']} {format_amount(resource, low)}: the largest "
                        f"network these blocks allow has {format_amount(resource, largest)} ({', '.join(names)}); "
                        f"lower {OPTIONS[resource, 'min']} to at most that")
    parts = []
    for resource in resources:
        low, high = budget.bounds(resource)
        others = Budget(**{f"{side}_{r}": getattr(budget, f"{side}_{r}") for r in resources if r != resource
                           for side in ("min", "max")})
        if high is not None:
            found = extreme(problem, resource, others, program=program)
            if found is not None:
                parts.append(f"within the other bounds the smallest network has {format_amount(resource, found[0])}"
                             f" ({', '.join(found[1])}), above {OPTIONS[resource, 'max']}")
        if low is not None:
            found = extreme(problem, resource, others, largest=True, program=program)
            if found is not None:
                parts.append(f"within the other bounds the largest network has {format_amount(resource, found[0])}, "
                             f"below {OPTIONS[resource, 'min']}")
    detail = "; ".join(parts) if parts else "no network meets even one bound together with the others"
    return f"no network meets the whole budget ({budget.describe()}), though each bound alone can be met: {detail}"


def describe_forbidden(problem: Problem, limit: int = 3) -> str:
    """A few reasons why pairs or candidates are excluded, for error messages."""
    reasons = list(dict.fromkeys([*problem.unusable.values(), *problem.reasons.values()]))
    if not reasons:
        return "no reasons recorded"
    more = f"; and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return "; ".join(reasons[:limit]) + more
