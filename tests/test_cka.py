"""Properties of linear CKA and of its streaming estimators (float64, synthetic features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reassembly.similarity.cka import SimilarityError, StreamingCKA, linear_cka


def features(n=300, d=20, seed=0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) + offset


def related(x, d_out=12, noise=0.5, seed=1):
    """A noisy nonlinear function of x: CKA with x is clearly between 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(x.shape[1], d_out, generator=generator, dtype=torch.float64)
    return torch.relu(x @ weight) + noise * torch.randn(len(x), d_out, generator=generator, dtype=torch.float64)


def stream(views, estimator="exact", batch=37, self_pairs=False):
    """Feed ``views`` (name -> list of (n, d) point tensors) to a StreamingCKA in batches of ``batch``."""
    cka = StreamingCKA({name: [p.shape[1] for p in points] for name, points in views.items()}, estimator, self_pairs)
    n = len(next(iter(views.values()))[0])
    for start in range(0, n, batch):
        cka.update({name: [p[start : start + batch] for p in points] for name, points in views.items()})
    return cka


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    x = features()
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    x, y = features(), related(features())
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    reference = linear_cka(x, y, debiased)
    assert 0.05 < reference < 0.95
    assert linear_cka(x @ q, y, debiased) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y, debiased) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x + 3.0, y - 2.0, debiased) == pytest.approx(reference, abs=1e-10)


def test_debiased_cka_is_near_zero_for_independent_features_where_biased_is_not():
    x, y = features(n=200, d=100, seed=0), features(n=200, d=100, seed=1)
    assert linear_cka(x, y, debiased=False) > 0.3  # the bias of the plain estimator at d ~ n
    assert abs(linear_cka(x, y, debiased=True)) < 0.05


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("batch", [5, 37, 300])
def test_exact_streaming_equals_the_full_batch(debiased, batch):
    x = features(offset=4.0)
    views = {"a": [x[:, :5], x, related(x, 8, seed=2)], "b": [related(x, 12), features(d=3, seed=5)]}
    cka = stream(views, "exact", batch)
    result = cka.result("a", "b", debiased)
    expected = np.array([[linear_cka(p, q, debiased) for q in views["b"]] for p in views["a"]])
    np.testing.assert_allclose(result, expected, atol=1e-10)
    np.testing.assert_allclose(cka.result("b", "a", debiased), expected.T, atol=1e-10)


def test_exact_self_pairs_compare_every_point_of_a_view_with_every_other():
    x = features()
    points = [x, related(x), related(x, 6, seed=3)]
    cka = stream({"a": points, "b": [x]}, "exact", 50, self_pairs=True)
    result = cka.result("a", "a", debiased=True)
    expected = np.array([[linear_cka(p, q, True) for q in points] for p in points])
    np.testing.assert_allclose(result, expected, atol=1e-10)
    np.testing.assert_allclose(np.diag(result), 1.0, atol=1e-12)


def test_minibatch_estimator_on_one_batch_equals_the_full_batch_debiased_cka():
    x = features(n=120)
    y = related(x)
    cka = stream({"a": [x], "b": [y]}, "minibatch", batch=120)
    assert cka.result("a", "b", debiased=True)[0, 0] == pytest.approx(linear_cka(x, y, True), abs=1e-10)
    assert cka.result("a", "b", debiased=False)[0, 0] == pytest.approx(linear_cka(x, y, False), abs=1e-10)


def test_minibatch_estimator_averages_unbiased_hsic_over_batches():
    """Nguyen, Raghu and Kornblith (2021): mean over batches of HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean ...)."""
    x = features(n=200)
    y = related(x)
    cka = stream({"a": [x], "b": [y]}, "minibatch", batch=50)

    def unbiased_hsic(p, q):
        n = len(p)
        k, l = p @ p.T, q @ q.T
        k.fill_diagonal_(0)
        l.fill_diagonal_(0)
        one = torch.ones(n, dtype=torch.float64)
        value = (k * l).sum() + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 * (one @ k @ l @ one) / (n - 2)
        return float(value / (n * (n - 3)))

    batches = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)]
    xy = np.mean([unbiased_hsic(p, q) for p, q in batches])
    xx = np.mean([unbiased_hsic(p, p) for p, _ in batches])
    yy = np.mean([unbiased_hsic(q, q) for _, q in batches])
    assert cka.result("a", "b", debiased=True)[0, 0] == pytest.approx(xy / np.sqrt(xx * yy), abs=1e-10)
    assert cka.result("a", "b", debiased=True)[0, 0] == pytest.approx(linear_cka(x, y, True), abs=0.05)


@pytest.mark.parametrize("estimator", ["exact", "minibatch"])
def test_states_of_disjoint_shards_add_up_to_the_whole(estimator):
    x = features(n=160)
    views = {"a": [x, related(x)], "b": [related(x, 9, seed=4)]}
    whole = stream(views, estimator, batch=40)
    first = stream({k: [p[:80] for p in v] for k, v in views.items()}, estimator, batch=40)
    second = stream({k: [p[80:] for p in v] for k, v in views.items()}, estimator, batch=40)
    first.merge(second.state())
    for debiased in (False, True):
        np.testing.assert_allclose(first.result("a", "b", debiased), whole.result("a", "b", debiased), atol=1e-12)


@pytest.mark.parametrize("estimator", ["exact", "minibatch"])
def test_a_constant_point_gives_zero_and_is_reported(estimator):
    x = features(n=80)
    constant = torch.full((80, 4), 3.0, dtype=torch.float64)
    cka = stream({"a": [x, constant], "b": [related(x)]}, estimator, batch=40)
    for debiased in (False, True):
        result = cka.result("a", "b", debiased)
        assert np.isfinite(result).all()
        assert result[1, 0] == 0.0 and result[0, 0] > 0.1
    assert cka.degenerate("a") == [1] and cka.degenerate("b") == []
    assert linear_cka(constant, x) == 0.0


def test_too_few_samples_and_bad_features_are_clear_errors():
    x = features(n=3)
    assert linear_cka(x, x) == pytest.approx(1.0)
    with pytest.raises(SimilarityError, match="at least 4 samples"):
        linear_cka(x, x, debiased=True)
    cka = stream({"a": [x], "b": [x]}, "exact", batch=3)
    with pytest.raises(SimilarityError, match="at least 4 samples; only 3"):
        cka.result("a", "b", debiased=True)
    with pytest.raises(SimilarityError, match="batches of at least 4"):
        stream({"a": [x], "b": [x]}, "minibatch", batch=3)
    with pytest.raises(SimilarityError, match="non-finite"):
        linear_cka(torch.full((5, 2), float("nan")), x[:1].repeat(5, 1))
    bad = StreamingCKA({"a": [3], "b": [2]})
    with pytest.raises(SimilarityError, match="expected point widths"):
        bad.update({"a": [features(d=4)], "b": [features(d=2)]})
    with pytest.raises(SimilarityError, match="no features for b"):
        bad.update({"a": [features(d=3)]})
    with pytest.raises(SimilarityError, match="estimator must be one of"):
        StreamingCKA({"a": [3]}, estimator="rbf")
