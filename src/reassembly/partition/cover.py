"""The cover-set partition (DeRy §3.2): cut every model's body into K contiguous blocks and group the blocks into K
equivalence sets of functionally similar blocks, by alternating boundary refinement, medoid re-anchoring and
nearest-anchor reassignment from many random starts.

Implementation notes (each one a decision the caller may need):

* **State.** Block ``i = m * K + k`` is stage ``k`` of model ``m``; ``cuts[m]`` holds its K+1 boundaries in chain
  indices. All point-CKA matrices are laid into one global matrix ``G`` (model ``m``'s points at ``offset[m] + p``),
  so a block's similarity to another block is two lookups and the block-by-block matrix is two fancy indexings.
* **Refinement sweep.** Pairs (k, k+1) go left to right; each step moves all models at once against the anchors'
  positions as they were at the start of the sweep (the official code also scored against stale anchors, §3.3).
  Candidates are compared in the order current, forward, backward, so ties keep the current boundary.
* **Anchors.** A block that is its set's anchor scores 2 against it whatever its extent, and any other block of the
  anchor's model scores 0, so a boundary between two anchors of one model does not move until re-anchoring picks
  another medoid (as in the official code; with two models and ties, medoids go to the first model).
* **Stopping.** A restart stops after ``patience`` consecutive iterations that do not beat *that restart's* best,
  or at once when an iteration changes nothing (cuts, anchors and sets), because every later iteration would repeat
  it; ``restart_iterations`` counts the iterations actually run.
* **Caps and starts.** The cap is ``ceil((1 + eps) * L / K)`` nodes or ``floor((1 + eps) * P / K)`` parameters
  of the body. When a parameter cap admits no partition (a node larger than the cap, or nodes that cannot be packed
  into K runs), that model's cap becomes the smallest one that does (at least its largest node); such models are
  listed in ``Partition.raised_caps``. Random starts are drawn uniformly among all cut configurations within the cap.
* **General mode.** A set never loses its anchor (an anchor is kept in its own set on reassignment), so no set is
  ever empty; a set may hold several blocks of one model (they score 0 with each other) or only its anchor. Sets are
  reported in order of their members' mean stage index. The objective sums over member pairs, so it can favour one
  large mixed set over stage-like sets (seen with 8 identical copies). Nothing guarantees that one block per set in
  set order makes a network there; that is what ``stage_aligned=True`` is for.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from .result import EquivalenceSet, ModelNodes, Partition, PartitionError

SIZES = ("nodes", "params")
SIMILARITIES = ("io", "first_last")
_IMPROVEMENT = 1e-9  # a restart's best must grow by more than this to count as an improvement


def block_similarity(
    points: Mapping[tuple[str, str], np.ndarray],
    a: str,
    block_a: tuple[int, int],
    b: str,
    block_b: tuple[int, int],
    mode: str = "io",
) -> float:
    """Functional similarity S of block ``block_a`` of model ``a`` and block ``block_b`` of model ``b``, in [-2, 2].

    ``"io"``: CKA at the block inputs plus CKA at the block outputs (the paper). ``"first_last"``: the output of each
    block's first node stands in for its input (the official code). Two blocks of the same model score 0, or 2 when
    they are the same block.
    """
    _check_option("similarity", mode, SIMILARITIES)
    (start_a, stop_a), (start_b, stop_b) = block_a, block_b
    if a == b:
        return 2.0 if tuple(block_a) == tuple(block_b) else 0.0
    matrix = _pair_matrix(points, a, b)
    for name, (start, stop), length in ((a, block_a, matrix.shape[0]), (b, block_b, matrix.shape[1])):
        if not 0 <= start < stop < length:
            raise PartitionError(f"block ({start}, {stop}) of model {name} is empty or outside its chain of "
                                 f"{length - 1} nodes; give a half-open node range inside the chain")
    shift = 1 if mode == "first_last" else 0
    return float(matrix[start_a + shift, start_b + shift] + matrix[stop_a, stop_b])


def partition(
    models: Sequence[ModelNodes],
    points: Mapping[tuple[str, str], np.ndarray],
    k: int = 4,
    eps: float = 0.2,
    *,
    size: str = "nodes",
    stage_aligned: bool = True,
    similarity: str = "io",
    restarts: int = 50,
    iterations: int = 50,
    patience: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> Partition:
    """Cut each model's body into ``k`` contiguous blocks and group them into ``k`` equivalence sets.

    ``points[(a, b)]`` is the (chain length of a + 1) x (chain length of b + 1) point-CKA matrix of models ``a`` and
    ``b``; one orientation suffices (``(a, b)`` wins when both are given, ``a`` first in ``models``; self-pairs and
    pairs of other models are ignored). A block holds at most ``ceil((1 + eps) * L / k)`` nodes (``size="nodes"``) or
    ``(1 + eps) * body params / k`` parameters (``size="params"``, raised for a model where that admits no partition,
    e.g. because one node is larger). ``stage_aligned`` fixes set j to the j-th block of every model. The best
    partition by within-set similarity over ``restarts`` random starts is returned; the same inputs and ``seed``
    give the same partition. ``iterations=0`` skips the refinement: the result is the best of ``restarts``
    uniformly drawn feasible partitions, and with ``restarts=1`` one random partition (DeRy's random-partition
    baseline, which ignores the similarity except to report its score).
    """
    problem = _Problem(models, points, k, eps, size, similarity)
    for name, value, least in (("restarts", restarts, 1), ("iterations", iterations, 0), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise PartitionError(f"{name} must be an integer of at least {least} (got {value!r})")
    rng = np.random.default_rng(seed)
    best: _State | None = None
    restart_scores, restart_iterations, best_restart = [], [], 0
    for restart in tqdm(range(restarts), desc="partition", unit="restart", disable=not progress):
        state, ran = problem.run(rng, stage_aligned, iterations, patience)
        restart_scores.append(state.score)
        restart_iterations.append(ran)
        if best is None or state.score > best.score:
            best, best_restart = state, restart
    assert best is not None
    return problem.result(best, dict(
        k=int(k), eps=float(eps), size=size, stage_aligned=bool(stage_aligned), similarity=similarity,
        restarts=int(restarts), iterations=int(iterations), patience=int(patience), seed=int(seed),
        restart_scores=tuple(restart_scores), restart_iterations=tuple(restart_iterations), best_restart=best_restart,
    ))


class _State:
    """One candidate solution: boundaries (M, K+1), the set of every block (M*K,), the anchor block of every set."""

    def __init__(self, cuts: np.ndarray, assign: np.ndarray, anchors: np.ndarray, score: float = -math.inf):
        self.cuts, self.assign, self.anchors, self.score = cuts, assign, anchors, score

    def copy(self) -> "_State":
        return _State(self.cuts.copy(), self.assign.copy(), self.anchors.copy(), self.score)


class _Problem:
    """Validated inputs and everything precomputed once: the global CKA matrix, size prefix sums, caps and the
    dynamic-programming counts that draw random feasible partitions uniformly."""

    def __init__(self, models, points, k, eps, size, similarity):
        _check_option("size", size, SIZES)
        _check_option("similarity", similarity, SIMILARITIES)
        models = list(models)
        if not models:
            raise PartitionError("no models to partition; give at least one dissected model")
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise PartitionError(
                    f"model name {model.name!r} appears more than once; give each model a unique name"
                )
            seen.add(model.name)
            _check_model(model)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise PartitionError(f"k must be an integer of at least 1 (got {k!r}); it is the blocks per model")
        shortest = min(models, key=lambda model: model.body_length)
        if shortest.body_length < k:
            raise PartitionError(f"model {shortest.name} has only {shortest.body_length} body nodes; "
                                 f"use --k {shortest.body_length} or fewer")
        if not eps >= 0 or not math.isfinite(eps):
            raise PartitionError(f"eps must be a finite number >= 0 (got {eps!r}); it is the allowed excess of a "
                                 "block over an equal share (0.2 = 20 %)")
        self.models, self.k = models, int(k)
        self.shift = 1 if similarity == "first_last" else 0
        count = len(models)
        lengths = np.array([model.points for model in models])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.global_cka = np.zeros((lengths.sum(), lengths.sum()))
        for i, a in enumerate(models):
            for j in range(i + 1, count):
                b = models[j]
                matrix = _pair_matrix(points, a.name, b.name, (a.points, b.points))
                rows = slice(self.offsets[i], self.offsets[i] + a.points)
                cols = slice(self.offsets[j], self.offsets[j] + b.points)
                self.global_cka[rows, cols] = matrix
                self.global_cka[cols, rows] = matrix.T
        blocks = np.arange(count * self.k)
        self.same_model = (blocks[:, None] // self.k) == (blocks[None, :] // self.k)
        # sizes: prefix sums over chain nodes, caps, and the sampler tables
        self.prefix, self.caps, self.raised, self.samplers = [], [], [], []
        for model in models:
            weights = np.array(model.node_params, np.int64)
            if size == "nodes":
                weights = np.ones_like(weights)
            prefix = np.concatenate([[0], np.cumsum(weights)])
            body = prefix[model.body[0] : model.body[1] + 1] - prefix[model.body[0]]
            nominal = _nominal_cap(self.k, eps, size, int(body[-1]))
            cap = nominal if _feasible(np.diff(body), self.k, nominal) else _smallest_cap(body, self.k)
            self.prefix.append(prefix)
            self.caps.append(cap)
            self.raised.append(cap != nominal)
            self.samplers.append(_Sampler(body, self.k, cap))
        self.prefix_table = np.zeros((count, lengths.max()), np.int64)  # (M, max chain length + 1)
        for m, prefix in enumerate(self.prefix):
            self.prefix_table[m, : len(prefix)] = prefix
            self.prefix_table[m, len(prefix) :] = prefix[-1]
        self.cap_array = np.array(self.caps, np.int64)
        self.firsts = np.array([model.body[0] for model in models])

    # ----------------------------------------------------------------------------------------------------------------
    def run(self, rng: np.random.Generator, stage_aligned: bool, iterations: int, patience: int) -> tuple[_State, int]:
        """One restart: random feasible cuts, random anchors, then refine / re-anchor / reassign until it stalls."""
        count, k = len(self.models), self.k
        cuts = np.stack([first + sampler.draw(rng) for first, sampler in zip(self.firsts, self.samplers)])
        if stage_aligned:
            anchors = rng.integers(count, size=k) * k + np.arange(k)
            assign = np.tile(np.arange(k), count)
        else:
            anchors = rng.choice(count * k, size=k, replace=False)
            assign = self._reassign(self._similarities(cuts), anchors)
        state = _State(cuts, assign, anchors)
        if iterations == 0:  # the drawn partition itself, scored but not refined
            state.score = self._score(self._similarities(cuts), assign)
            return state, 0
        best, stall, ran = state.copy(), 0, 0
        for _ in range(iterations):
            ran += 1
            previous = state.copy()
            self._refine(state)
            similarities = self._similarities(state.cuts)
            state.anchors = self._medoids(similarities, state.assign)
            if not stage_aligned:
                state.assign = self._reassign(similarities, state.anchors)
            state.score = self._score(similarities, state.assign)
            if state.score > best.score + _IMPROVEMENT:
                best, stall = state.copy(), 0
            else:
                stall += 1
                if stall >= patience:
                    break
            if (np.array_equal(state.cuts, previous.cuts) and np.array_equal(state.assign, previous.assign)
                    and np.array_equal(state.anchors, previous.anchors)):
                break  # a fixed point: every further iteration would repeat this one
        return best, ran

    def _points(self, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global indices of every block's input point (shifted in first_last mode) and output point."""
        base = self.offsets[:, None]
        return (base + cuts[:, :-1] + self.shift).ravel(), (base + cuts[:, 1:]).ravel()

    def _similarities(self, cuts: np.ndarray) -> np.ndarray:
        """S between every pair of blocks, (M*K, M*K): 0 within a model, 2 on the diagonal."""
        inputs, outputs = self._points(cuts)
        cka = self.global_cka
        similarities = cka[inputs[:, None], inputs[None, :]] + cka[outputs[:, None], outputs[None, :]]
        similarities[self.same_model] = 0.0
        np.fill_diagonal(similarities, 2.0)
        return similarities

    def _refine(self, state: _State) -> None:
        """One Kernighan-Lin-style sweep: for each adjacent pair, keep / move one node forward / backward, all models
        at once, by the two blocks' similarity to the anchors of their sets."""
        k, cuts, cka = self.k, state.cuts, self.global_cka
        anchor_in, anchor_out = (points[state.anchors] for points in self._points(cuts))
        anchor_model = state.anchors // k
        models = np.arange(len(self.models))
        base = self.offsets[:, None]
        last = cka.shape[0] - 1
        for stage in range(k - 1):
            left, middle, right = cuts[:, stage, None], cuts[:, stage + 1, None], cuts[:, stage + 2, None]
            candidates = middle + np.array([0, 1, -1])  # current; forward: block k receives; backward: k+1 does
            boundary = self.prefix_table[models[:, None], candidates]
            receiver = np.where(
                candidates > middle,
                boundary - self.prefix_table[models[:, None], left],  # the new size of block k
                self.prefix_table[models[:, None], right] - boundary,  # the new size of block k+1
            )
            # the donor keeps a node; the receiver stays within the cap (the official code checked the donor)
            allowed = (candidates > left) & (candidates < right) & (receiver <= self.cap_array[:, None])
            value = np.zeros(candidates.shape)
            for offset, start, stop in ((0, left, candidates), (1, candidates, right)):
                block = models * k + stage + offset
                sets = state.assign[block]
                term = (cka[np.minimum(base + start + self.shift, last), anchor_in[sets][:, None]]
                        + cka[base + stop, anchor_out[sets][:, None]])
                term = np.where((anchor_model[sets] == models)[:, None], 0.0, term)  # another block of this model
                term = np.where((state.anchors[sets] == block)[:, None], 2.0, term)  # the block is the anchor
                value += term
            value[~allowed] = -np.inf
            choice = np.argmax(value, axis=1)
            cuts[:, stage + 1] = candidates[models, choice]

    def _medoids(self, similarities: np.ndarray, assign: np.ndarray) -> np.ndarray:
        """Each set's member with the largest summed similarity to the other members (ties: lowest block index)."""
        membership = assign[:, None] == np.arange(self.k)[None, :]
        off_diagonal = similarities - np.diag(np.diag(similarities))
        totals = np.where(membership, off_diagonal @ membership, -np.inf)
        return np.argmax(totals, axis=0)

    def _reassign(self, similarities: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """Every block to its most similar anchor (ties: lowest set); an anchor always stays in its own set."""
        assign = np.argmax(similarities[:, anchors], axis=1)
        assign[anchors] = np.arange(self.k)
        return assign

    def _score(self, similarities: np.ndarray, assign: np.ndarray) -> float:
        """Sum over sets of the sum over unordered member pairs of S."""
        membership = (assign[:, None] == np.arange(self.k)[None, :]).astype(float)
        off_diagonal = similarities - np.diag(np.diag(similarities))
        return float(0.5 * np.sum(membership * (off_diagonal @ membership)))

    # ----------------------------------------------------------------------------------------------------------------
    def result(self, best: _State, fields: dict) -> Partition:
        k, names = self.k, [model.name for model in self.models]
        anchors = self._medoids(self._similarities(best.cuts), best.assign)  # the medoid of each set as reported
        order = list(range(k))
        if not fields["stage_aligned"]:
            stages = np.arange(len(best.assign)) % k
            order.sort(key=lambda j: (float(stages[best.assign == j].mean()), int(anchors[j])))
        sets = tuple(
            EquivalenceSet(
                anchor=(names[anchors[j] // k], int(anchors[j] % k)),
                members=tuple((names[i // k], int(i % k)) for i in np.flatnonzero(best.assign == j)),
            )
            for j in order
        )
        blocks, block_params = {}, {}
        for m, model in enumerate(self.models):
            bounds = [int(c) for c in best.cuts[m]]
            blocks[model.name] = tuple(zip(bounds[:-1], bounds[1:]))
            block_params[model.name] = tuple(int(sum(model.node_params[a:b])) for a, b in blocks[model.name])
        return Partition(
            score=float(best.score), blocks=blocks, block_params=block_params,
            caps={name: int(cap) for name, cap in zip(names, self.caps)},
            raised_caps=tuple(name for name, raised in zip(names, self.raised) if raised),
            sets=sets, **fields,
        )


class _Sampler:
    """Uniform draws among all ways to cut a body into K non-empty contiguous blocks of size <= cap.

    ``counts[j][p]`` is the number of ways to cut body positions p..L into j such blocks; a draw walks from p = 0,
    picking each next boundary q with probability ``counts[j-1][q] / counts[j][p]``. Counts are floats: exact up to
    2**53 and only used as relative weights beyond.
    """

    def __init__(self, body_prefix: np.ndarray, k: int, cap: int):
        length = len(body_prefix) - 1
        self.k = k
        # furthest boundary q reachable from p: the largest q with size(p, q) <= cap (>= p + 1 since cap is feasible)
        self.reach = np.searchsorted(body_prefix, body_prefix[:-1] + cap, side="right") - 1
        counts = [np.zeros(length + 1)]
        counts[0][length] = 1.0
        positions = np.arange(length)
        for _ in range(k):
            cumulative = np.concatenate([[0.0], np.cumsum(counts[-1])])
            row = np.zeros(length + 1)
            row[:length] = cumulative[self.reach + 1] - cumulative[positions + 1]
            counts.append(row)
        self.counts = counts

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        bounds, position = [0], 0
        for remaining in range(self.k, 0, -1):
            weights = self.counts[remaining - 1][position + 1 : self.reach[position] + 1]
            cumulative = np.cumsum(weights)
            choice = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
            position = position + 1 + min(choice, len(weights) - 1)
            bounds.append(position)
        return np.array(bounds)


# --------------------------------------------------------------------------------------------------------------------
def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PartitionError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}")


def _check_model(model: ModelNodes) -> None:
    first, stop = model.body
    length = len(model.node_params)
    if not 0 <= first <= stop <= length:
        raise PartitionError(f"model {model.name} has body {model.body} outside its chain of {length} nodes; "
                             "give the body as a node range [first, stop) inside the chain")
    if any(int(p) != p or p < 0 for p in model.node_params):
        raise PartitionError(f"model {model.name} has a negative or non-integer node parameter count; "
                             "give node_params as the chain's NodeInfo.params")
    if model.node_names and len(model.node_names) != length:
        raise PartitionError(f"model {model.name} has {len(model.node_names)} node names for {length} nodes; "
                             "give one name per chain node or none")


def _pair_matrix(points, a: str, b: str, expected: tuple[int, int] | None = None) -> np.ndarray:
    """The point-CKA matrix of ``a`` (rows) and ``b`` (columns), from either orientation, checked."""
    if (a, b) in points:
        matrix, flipped = np.asarray(points[a, b], dtype=np.float64), False
    elif (b, a) in points:
        matrix, flipped = np.asarray(points[b, a], dtype=np.float64), True
    else:
        raise PartitionError(f"no similarity between models {a} and {b}; run the similarity stage on both "
                             f"(points has neither ({a!r}, {b!r}) nor ({b!r}, {a!r}))")
    given = f"points[({b!r}, {a!r})]" if flipped else f"points[({a!r}, {b!r})]"
    if matrix.ndim != 2:
        raise PartitionError(f"similarity between models {a} and {b} ({given}) is not a matrix (shape "
                             f"{matrix.shape}); give one row per point of the first model, one column per point of "
                             "the second")
    if expected is not None and matrix.shape != (expected[::-1] if flipped else expected):
        raise PartitionError(f"similarity between models {a} and {b} ({given}) has shape {matrix.shape}, expected "
                             f"{expected[::-1] if flipped else expected} (chain length + 1 points per model); "
                             "recompute it for the current chains")
    if not np.all(np.isfinite(matrix)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(matrix))[0])
        raise PartitionError(f"similarity between models {a} and {b} ({given}) has a non-finite value (NaN or inf) "
                             f"at points {bad}; recompute the similarity stage")
    if flipped:
        matrix = matrix.T
    return matrix


def _nominal_cap(k: int, eps: float, size: str, total: int) -> int:
    """ceil((1 + eps) * L / K) nodes, or floor((1 + eps) * params / K) parameters (block params are integers);
    rounded to 9 digits first so that e.g. 1.2 * 10 / 4 counts as 3, not 3.0000000000000004."""
    share = round((1 + eps) * total / k, 9)
    return math.ceil(share) if size == "nodes" else math.floor(share)


def _feasible(sizes: np.ndarray, k: int, cap: int) -> bool:
    """Whether ``sizes`` (non-negative, len >= k) can be cut into k non-empty contiguous runs of sum <= cap: greedy
    packing gives the fewest runs, and a run can always be split further."""
    if len(sizes) == 0 or sizes.max() > cap:
        return False
    runs, current = 1, 0
    for value in sizes.tolist():
        if current + value > cap:
            runs, current = runs + 1, 0
        current += value
    return runs <= k


def _smallest_cap(body_prefix: np.ndarray, k: int) -> int:
    """The smallest cap that admits a partition: binary search over all contiguous-run sums."""
    sums = np.unique((body_prefix[None, :] - body_prefix[:, None])[np.triu_indices(len(body_prefix), 1)])
    sizes = np.diff(body_prefix)
    low, high = 0, len(sums) - 1  # the whole body's sum is always feasible for one run, hence for k <= L runs
    while low < high:
        middle = (low + high) // 2
        if _feasible(sizes, k, int(sums[middle])):
            high = middle
        else:
            low = middle + 1
    return int(sums[low])
