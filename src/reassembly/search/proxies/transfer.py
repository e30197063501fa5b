"""Transferability proxies: how well an assembled network, fitted in closed form, serves the target task.

The architecture proxies (NASWOT, synflow, ...) score a network at its default initialisation and cannot see what
its pretrained blocks know about the target; over 24 fine-tuned Split-CIFAR assemblies none of them ranked better
than counting parameters. These proxies score the network *after* the least-squares initialisation
(:func:`reassembly.stitch.init.least_squares_init`, fitted by the search on a seeded probe of target training images)
on other target training images (the batches given), through the features the head pools and its logits:

======== ===================================================================== ======= ============================
name     what it measures                                                      better  scale
======== ===================================================================== ======= ============================
fit      top-1 accuracy (%) of the fitted network                              higher  0 to 100
fit_loss cross-entropy of the fitted network's logits                          lower   0 to a few nats
logme    LogME: log evidence per image of a Bayesian linear model of the      higher  about -2 to 2 (nats/image)
         one-hot labels on the pooled features (You et al. 2021), class-averaged
knn      leave-one-out k-nearest-neighbour accuracy (%) of the pooled features higher  0 to 100
         (cosine similarity, k = 10)
======== ===================================================================== ======= ============================

Each function takes a :class:`Fitted` (pooled features, logits and labels of the target images); the search makes
it while fitting (the images ride along the fit's forward passes, :class:`reassembly.stitch.init.FitCache`), and
``Proxy.score(net, batches)`` makes it by running ``net``.

Cost: one least-squares fit and one forward pass over the batches per network (features of the pooled head input);
``logme`` adds an SVD of the (images x features) matrix, ``knn`` an images x images similarity. None gives block
terms, so above the search's scoring limit the program pre-ranks by a surrogate (see :mod:`reassembly.search.stage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import Batch

KNN_K = 10


@dataclass(frozen=True)
class Fitted:
    """A fitted network seen through its head on target images: pooled features (N x D), logits (N x C) and the
    images' labels (N). What a transfer proxy's function receives."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, net: nn.Module, batches: list[Batch]) -> Fitted:
        """Run ``net`` (in eval mode) on ``batches``, reading the input of its head's ``fc``."""
        head = getattr(getattr(net, "head", None), "fc", None)
        if not isinstance(head, nn.Linear):
            raise TypeError("transferability proxies read the pooled features of a reassembled network's head.fc")
        seen: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
        net.eval()
        try:
            logits = torch.cat([net(images) for images, _ in batches])
        finally:
            handle.remove()
        labels = torch.cat([labels for _, labels in batches]).long()
        return cls(torch.cat(seen).double(), logits.double(), labels)


def fit_accuracy(fitted: Fitted) -> float:
    return 100.0 * float((fitted.logits.argmax(1) == fitted.labels).double().mean())


def fit_loss(fitted: Fitted) -> float:
    return float(F.cross_entropy(fitted.logits.double(), fitted.labels))


def logme_score(features: torch.Tensor, labels: torch.Tensor, iterations: int = 100, tolerance: float = 1e-4
                ) -> float:
    """LogME of ``features`` (N x D) for integer ``labels``: for each class, the one-hot column y is modelled as
    ``y = F w + noise`` with prior ``w ~ N(0, 1/alpha)`` and noise ``N(0, 1/beta)``; alpha and beta maximise the
    marginal likelihood by MacKay's fixed-point updates, computed in the eigenbasis of ``F^T F`` for all classes at
    once; the score is the maximised log evidence divided by N, averaged over the classes."""
    f = features.double()
    n, d = f.shape
    y = F.one_hot(labels.long()).double()  # N x C
    u, singular, _ = torch.linalg.svd(f, full_matrices=False)  # f = u diag(s) v^T, rank r = min(n, d)
    sigma = singular**2  # eigenvalues of f^T f (the other d - r are 0)
    z = u.T @ y  # r x C: the labels in the left singular basis
    z2 = z**2
    outside = (y**2).sum(0) - z2.sum(0)  # the part of |y|^2 no linear map of the features reaches
    alpha = torch.ones(y.shape[1], dtype=torch.float64)
    beta = torch.ones(y.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        denominator = alpha[None, :] + beta[None, :] * sigma[:, None]  # r x C
        gamma = (beta[None, :] * sigma[:, None] / denominator).sum(0)
        m2 = (beta[None, :] ** 2 * sigma[:, None] * z2 / denominator**2).sum(0)  # |m|^2
        residual = (alpha[None, :] ** 2 * z2 / denominator**2).sum(0) + outside  # |F m - y|^2
        new_alpha = gamma / m2.clamp_min(1e-12)
        new_beta = (n - gamma) / residual.clamp_min(1e-12)
        converged = ((new_alpha / alpha - 1).abs().max() < tolerance) and ((new_beta / beta - 1).abs().max() < tolerance)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    denominator = alpha[None, :] + beta[None, :] * sigma[:, None]
    m2 = (beta[None, :] ** 2 * sigma[:, None] * z2 / denominator**2).sum(0)
    residual = (alpha[None, :] ** 2 * z2 / denominator**2).sum(0) + outside
    log_det = torch.log(denominator).sum(0) + (d - len(sigma)) * torch.log(alpha)  # log det(alpha I + beta F^T F)
    evidence = (n / 2 * torch.log(beta) + d / 2 * torch.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * residual - alpha / 2 * m2 - log_det / 2)
    return float((evidence / n).mean())


def logme(fitted: Fitted) -> float:
    return logme_score(fitted.features, fitted.labels)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = KNN_K) -> float:
    """Leave-one-out accuracy (%) of a k-nearest-neighbour vote by cosine similarity (each neighbour's vote weighs
    its similarity, so ties are rare); ``k`` is capped at N - 1."""
    n = len(features)
    if n < 2:
        return float("nan")
    unit = F.normalize(features.double() - features.double().mean(0), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    values, neighbours = similarity.topk(min(k, n - 1), dim=1)
    votes = torch.zeros(n, int(labels.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, labels[neighbours], values + 1)  # cosine + 1 >= 0: nearer neighbours weigh more
    return 100.0 * float((votes.argmax(1) == labels).double().mean())


def knn(fitted: Fitted) -> float:
    return knn_accuracy(fitted.features, fitted.labels)
