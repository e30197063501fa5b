"""Linear CKA, biased and debiased, on full batches or streamed over minibatches in float64.

``linear_cka(X, Y)`` is the reference: the feature-space form ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
(Kornblith et al. 2019), or, debiased, the same ratio of unbiased HSIC estimates (Song et al. 2012), which stays
near 0 for independent features even when the feature width approaches the number of samples.

:class:`StreamingCKA` compares several *views* at once (one view per model, each a list of *points*: the pooled
features at a node boundary) and accumulates over minibatches, so memory does not grow with the probe set:

* ``estimator="exact"`` keeps sufficient statistics of the linear kernel (sums, cross products and
  squared-norm moments), which are additive over samples. It gives exactly the full-batch biased *and* debiased CKA
  whatever the batching or the split across processes. Memory is D_a x D_b per pair of views (D: summed widths).
* ``estimator="minibatch"`` (default) averages unbiased HSIC over minibatches (Nguyen, Raghu and Kornblith 2021). Its memory
  is independent of the feature widths (points x points per pair), but the value depends on the batch size; the
  debiased result of a single batch equals the full-batch debiased CKA.

A degenerate point (constant over the probe set: its centred sum of squares is at most ``CONSTANT`` times its raw one,
so its self-HSIC is 0 up to rounding) has no defined CKA; it is reported as 0 and listed by
:meth:`StreamingCKA.degenerate`, never returned as NaN. Debiased self-HSIC can also come out at or below 0 on very
few samples; those CKA values are reported as 0 too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import ReassemblyError

ESTIMATORS = ("exact", "minibatch")
CONSTANT = 1e-9  # a point whose centred sum of squares is at most this fraction of its raw one counts as constant


class SimilarityError(ReassemblyError):
    """Features that CKA cannot compare: too few samples, mismatched shapes, non-finite values."""


def min_samples(debiased: bool) -> int:
    """Fewest samples an estimate needs: 2 for biased HSIC, 4 for the unbiased one (it divides by n - 3)."""
    return 4 if debiased else 2


def _as_float64(x) -> torch.Tensor:
    tensor = torch.as_tensor(x).detach().to("cpu", torch.float64)
    return tensor.reshape(len(tensor), -1)


def _hsic_terms(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> float:
    """HSIC of two centred-or-not feature matrices, up to a factor shared by every pair of the same sample set."""
    n = x.shape[0]
    x, y = x - x.mean(0), y - y.mean(0)  # both estimators are translation invariant; centring keeps precision
    if not debiased:
        return float(torch.linalg.matrix_norm(x.T @ y) ** 2)
    kx, ky = x @ x.T, y @ y.T
    kx.fill_diagonal_(0)
    ky.fill_diagonal_(0)
    row_x, row_y = kx.sum(1), ky.sum(1)
    trace = float((kx * ky).sum())
    return trace + float(row_x.sum() * row_y.sum()) / ((n - 1) * (n - 2)) - 2 * float(row_x @ row_y) / (n - 2)


def _ratio(cross, self_x, self_y):
    """CKA from HSIC values; 0 where a side is degenerate (documented value instead of NaN)."""
    cross, self_x, self_y = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (cross, self_x, self_y)))
    denominator = np.sqrt(np.clip(self_x, 0, None) * np.clip(self_y, 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(denominator > 0, cross / np.where(denominator > 0, denominator, 1), 0.0)
    return value


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA between ``x`` (n, d1) and ``y`` (n, d2) on the whole batch, in float64.

    Inputs of more than two dimensions are flattened per sample. A constant input gives 0."""
    x, y = _as_float64(x), _as_float64(y)
    if x.shape[0] != y.shape[0]:
        raise SimilarityError(f"CKA compares the same samples: got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] < min_samples(debiased):
        kind = "debiased" if debiased else "biased"
        raise SimilarityError(f"{kind} CKA needs at least {min_samples(debiased)} samples, got {x.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise SimilarityError("CKA got non-finite features (NaN or inf)")
    if _is_constant(x) or _is_constant(y):
        return 0.0
    return float(_ratio(_hsic_terms(x, y, debiased), _hsic_terms(x, x, debiased), _hsic_terms(y, y, debiased)))


def _is_constant(x: torch.Tensor) -> bool:
    centred = float((x - x.mean(0)).square().sum())
    return centred <= CONSTANT * float(x.square().sum())


def _indicator(widths: Sequence[int]) -> torch.Tensor:
    """(D, P) matrix summing feature columns into their points."""
    owner = torch.repeat_interleave(torch.arange(len(widths)), torch.as_tensor(list(widths)))
    return torch.nn.functional.one_hot(owner, len(widths)).to(torch.float64)


def _u_centre(gram: torch.Tensor) -> torch.Tensor:
    """Centre a batch of Gram matrices (P, n, n) in place so that their inner product is n(n-3) x unbiased HSIC."""
    n = gram.shape[-1]
    gram.diagonal(dim1=-2, dim2=-1).zero_()
    means = gram.sum(-1) / (n - 2)
    means -= means.sum(-1, keepdim=True) / (2 * (n - 1))
    gram.sub_(means[..., :, None]).sub_(means[..., None, :])
    gram.diagonal(dim1=-2, dim2=-1).zero_()
    return gram


class StreamingCKA:
    """Accumulate linear CKA between every point of every pair of views over minibatches.

    ``widths[view]`` lists the feature width of each of the view's points; ``update`` takes, per view, one
    (batch, width) tensor per point, all for the same images. ``result(a, b)`` returns the (P_a, P_b) CKA matrix.
    Self-pairs are compared only when ``self_pairs`` is set. The state is a dict of float64 arrays that add up
    over disjoint sample sets (:meth:`state`, :meth:`merge`), which is what makes checkpoints and sharding exact.

    ``reference`` (per view, one batch of features per point, e.g. the first probe batch) is subtracted as a mean
    from every batch: CKA does not change under translation, but sums of raw moments lose precision when features
    sit far from 0 (logits, unnormalised maps). Every shard of one computation must use the same reference."""

    def __init__(self, widths: Mapping[str, Sequence[int]], estimator: str = "minibatch", self_pairs: bool = False,
                 reference: Mapping[str, Sequence[torch.Tensor]] | None = None):
        if estimator not in ESTIMATORS:
            raise SimilarityError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
        self.widths = {view: [int(w) for w in point_widths] for view, point_widths in widths.items()}
        for view, point_widths in self.widths.items():
            if not point_widths or min(point_widths) < 1:
                raise SimilarityError(f"view {view!r} needs at least one point of positive width, got {point_widths}")
        self.estimator = estimator
        views = list(self.widths)
        self.pairs = [(a, b) for i, a in enumerate(views) for b in views[i + (0 if self_pairs else 1):]]
        self._indicators = {view: _indicator(w) for view, w in self.widths.items()}
        self._offsets = {view: np.concatenate([[0], np.cumsum(w)]) for view, w in self.widths.items()}
        self._state: dict[str, np.ndarray] = {"n": np.zeros(1)}
        self._shift = {view: torch.zeros(sum(w), dtype=torch.float64) for view, w in self.widths.items()}
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        if reference is not None:
            stacked, _ = self._stack(reference)
            self._shift = {view: z.mean(0) for view, z in stacked.items()}

    # -- accumulation ------------------------------------------------------------------------------------------------
    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.numpy()
        if key in self._state:
            self._state[key] += value
        else:
            self._state[key] = value.copy()

    @property
    def shift(self) -> dict[str, np.ndarray]:
        """The reference mean subtracted from each view's features (zeros without a reference)."""
        return {view: shift.numpy() for view, shift in self._shift.items()}

    def _stack(self, features: Mapping[str, Sequence[torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int]:
        missing = [view for view in self.widths if view not in features]
        if missing:
            raise SimilarityError(f"update() got no features for {', '.join(missing)}")
        stacked, batch = {}, None
        for view, point_widths in self.widths.items():
            points = [_as_float64(point) for point in features[view]]
            widths = [point.shape[1] for point in points]
            if widths != point_widths:
                raise SimilarityError(f"view {view!r}: expected point widths {point_widths}, got {widths}")
            rows = {point.shape[0] for point in points}
            if len(rows) != 1 or (batch is not None and rows != {batch}):
                raise SimilarityError(f"view {view!r}: every point must hold the same images as the other views")
            batch = rows.pop()
            stacked[view] = torch.cat(points, dim=1)
            if not torch.isfinite(stacked[view]).all():
                raise SimilarityError(f"view {view!r}: non-finite features (NaN or inf) in this batch")
        return stacked, batch

    def update(self, features: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """Add one minibatch: ``features[view][p]`` is a (batch, width_p) tensor for point ``p`` of ``view``."""
        stacked, batch = self._stack(features)
        stacked = {view: z - self._shift[view] for view, z in stacked.items()}
        if self.estimator == "minibatch" and batch < min_samples(True):
            raise SimilarityError(f"the minibatch estimator needs batches of at least 4 samples, got {batch}")
        self._state["n"] += batch
        if self.estimator == "exact":
            self._update_exact(stacked)
        else:
            self._update_minibatch(stacked)

    def _update_exact(self, stacked: dict[str, torch.Tensor]) -> None:
        norms = {view: (z * z) @ self._indicators[view] for view, z in stacked.items()}  # (n, P) squared norms
        for view, z in stacked.items():
            offsets = self._offsets[view]
            self._add(f"{view}/sum", z.sum(0))
            self._add(f"{view}/sqnorm", norms[view].sum(0))
            for p in range(len(self.widths[view])):
                block = z[:, offsets[p] : offsets[p + 1]]
                self._add(f"{view}/gram{p}", block.T @ block)
                self._add(f"{view}/cube{p}", block.T @ norms[view][:, p])
            self._add(f"{view}/quartic", (norms[view] ** 2).sum(0))
        for a, b in self.pairs:
            self._add(f"{a}|{b}/cross", stacked[a].T @ stacked[b])
            self._add(f"{a}|{b}/a_by_normb", stacked[a].T @ norms[b])
            self._add(f"{a}|{b}/b_by_norma", stacked[b].T @ norms[a])
            self._add(f"{a}|{b}/norms", norms[a].T @ norms[b])

    def _buffers(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (all points, batch, batch) float64 buffers kept across batches: allocating and freeing tens of MB per
        batch makes the allocator hand memory back to the system and fault it in again, which also slows the forward
        passes running between updates (measured in benchmarks/bench_similarity.py)."""
        shape = (sum(len(w) for w in self.widths.values()), batch, batch)
        if self._scratch is None or self._scratch[0].shape != shape:
            self._scratch = (torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64))
        return self._scratch

    def _update_minibatch(self, stacked: dict[str, torch.Tensor]) -> None:
        """The Gram matrices of every point of every view go into one buffer, so that all the inner products between
        them are one matrix product (one pass over the buffer instead of one per pair of views)."""
        n = next(iter(stacked.values())).shape[0]
        grams, unbiased = self._buffers(n)
        rows, first = {}, 0
        for view, z in stacked.items():
            offsets = self._offsets[view]
            rows[view] = slice(first, first + len(offsets) - 1)
            z = z - z.mean(0)  # the Gram of centred features is H K H; U-centring gives the same for K and H K H
            for point, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
                torch.mm(z[:, s:e], z[:, s:e].T, out=grams[first + point])
            first = rows[view].stop
            self._add(f"{view}/sqnorm", (stacked[view] * stacked[view]).sum(0) @ self._indicators[view])
            self._add(f"{view}/centred", (z * z).sum(0) @ self._indicators[view])
        unbiased = _u_centre(unbiased.copy_(grams)).reshape(len(grams), -1).mul_(1 / np.sqrt(n * (n - 3)))
        biased = grams.reshape(len(grams), -1).mul_(1 / (n - 1))
        products = {"debiased": unbiased @ unbiased.T, "biased": biased @ biased.T}
        for kind, product in products.items():
            for view, rows_v in rows.items():
                self._add(f"{view}/self_{kind}", product[rows_v, rows_v].diagonal())
            for a, b in self.pairs:
                self._add(f"{a}|{b}/{kind}", product[rows[a], rows[b]])

    # -- state -------------------------------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return int(self._state["n"][0])

    def state(self) -> dict[str, np.ndarray]:
        """The accumulated sums (float64 arrays); adding two states of disjoint samples gives the state of both."""
        return dict(self._state)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._state = {key: np.array(value, dtype=np.float64) for key, value in state.items()}

    def merge(self, state: Mapping[str, np.ndarray]) -> None:
        """Add the sums of another accumulator over other samples (another shard of the probe set, accumulated
        with the same reference)."""
        for key, value in state.items():
            self._add(key, torch.from_numpy(np.asarray(value, dtype=np.float64)))

    # -- results -----------------------------------------------------------------------------------------------------
    def _require(self, debiased: bool) -> int:
        n = self.samples
        if n < min_samples(debiased):
            kind = "debiased" if debiased else "biased"
            raise SimilarityError(f"{kind} CKA needs at least {min_samples(debiased)} samples; only {n} were seen")
        return n

    def _self_hsic(self, view: str, debiased: bool) -> np.ndarray:
        if self.estimator == "minibatch":
            return self._state[f"{view}/self_{'debiased' if debiased else 'biased'}"]
        n = self._require(debiased)
        s, offsets = self._state[f"{view}/sum"], self._offsets[view]
        values = []
        for p in range(len(self.widths[view])):
            gram, sp = self._state[f"{view}/gram{p}"], s[offsets[p] : offsets[p + 1]]
            if not debiased:
                values.append(np.sum((gram - np.outer(sp, sp) / n) ** 2))
                continue
            trace = np.sum(gram**2) - self._state[f"{view}/quartic"][p]
            total = sp @ sp - self._state[f"{view}/sqnorm"][p]
            rows = sp @ gram @ sp - 2 * sp @ self._state[f"{view}/cube{p}"] + self._state[f"{view}/quartic"][p]
            values.append(trace + total**2 / ((n - 1) * (n - 2)) - 2 * rows / (n - 2))
        return np.array(values)

    def _centred_sqnorm(self, view: str) -> np.ndarray:
        """Per point, the sum over samples of squared distances to the mean (over each batch, for "minibatch")."""
        if self.estimator == "minibatch":
            return self._state[f"{view}/centred"]
        s, offsets = self._state[f"{view}/sum"], self._offsets[view]
        return self._state[f"{view}/sqnorm"] - np.add.reduceat(s * s, offsets[:-1]) / max(self.samples, 1)

    def degenerate(self, view: str) -> list[int]:
        """Points of ``view`` that were constant over the samples seen (their CKA is reported as 0)."""
        constant = self._centred_sqnorm(view) <= CONSTANT * self._state[f"{view}/sqnorm"]
        return [int(p) for p in np.flatnonzero(constant)]

    def _blocks(self, matrix: np.ndarray, a: str, b: str) -> np.ndarray:
        """Sum a (D_a, D_b) matrix over each (point of a, point of b) block."""
        rows = np.add.reduceat(matrix, self._offsets[a][:-1], axis=0)
        return np.add.reduceat(rows, self._offsets[b][:-1], axis=1)

    def _cross_hsic(self, a: str, b: str, debiased: bool) -> np.ndarray:
        if self.estimator == "minibatch":
            return self._state[f"{a}|{b}/{'debiased' if debiased else 'biased'}"]
        n = self._require(debiased)
        cross = self._state[f"{a}|{b}/cross"]
        sa, sb = self._state[f"{a}/sum"], self._state[f"{b}/sum"]
        if not debiased:
            centred = cross - np.outer(sa / n, sb)
            return self._blocks(centred * centred, a, b)
        norms = self._state[f"{a}|{b}/norms"]
        trace = self._blocks(cross * cross, a, b) - norms
        squares_a = np.add.reduceat(sa * sa, self._offsets[a][:-1]) - self._state[f"{a}/sqnorm"]
        squares_b = np.add.reduceat(sb * sb, self._offsets[b][:-1]) - self._state[f"{b}/sqnorm"]
        rows = (
            self._blocks(sa[:, None] * cross * sb[None, :], a, b)
            - np.add.reduceat(sa[:, None] * self._state[f"{a}|{b}/a_by_normb"], self._offsets[a][:-1], axis=0)
            - np.add.reduceat(sb[:, None] * self._state[f"{a}|{b}/b_by_norma"], self._offsets[b][:-1], axis=0).T
            + norms
        )
        return trace + np.outer(squares_a, squares_b) / ((n - 1) * (n - 2)) - 2 * rows / (n - 2)

    def result(self, a: str, b: str, debiased: bool = False) -> np.ndarray:
        """(P_a, P_b) matrix of linear CKA between the points of views ``a`` and ``b`` over every sample seen."""
        self._require(debiased)
        if (a, b) not in self.pairs:
            if (b, a) in self.pairs:
                return self.result(b, a, debiased).T
            raise SimilarityError(f"no accumulated pair ({a}, {b}); known pairs: {self.pairs}")
        cross = self._cross_hsic(a, b, debiased)
        value = _ratio(cross, self._self_hsic(a, debiased)[:, None], self._self_hsic(b, debiased)[None, :])
        value[self.degenerate(a), :] = 0.0
        value[:, self.degenerate(b)] = 0.0
        return value
