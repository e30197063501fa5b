"""Training-free proxies: a score of an untrained (assembled) network on a few target images, and a registry.

Each proxy is a function ``fn(net, batches, parts=None) -> (score, part_terms)``: ``batches`` is a list of
``(images, labels)`` (images normalised as ``net`` expects), ``parts`` a list of submodules of ``net`` whose *block
terms* are wanted (``None`` or a list of floats back). The 0-1 program's objective is the sum of the block terms of
the chosen blocks, measured once per zoo model (its blocks as the parts of the model followed by a fresh head); the
score itself ranks assembled networks. The built-ins, each documented (sign, scale, block term) in its module:

=============== ================================================================= ======
name            what it measures                                                  better
=============== ================================================================= ======
naswot          log det of the binary activation-code kernel (DeRy's proxy)       higher
naswot_official naswot plus the codes of every ``nn.Linear``, attention and       higher
                ``nn.Dropout`` output, as the official DeRy code hooks them (a
                larger score; more so with ViT blocks; see :mod:`.naswot`)
synflow         log of the summed synaptic-flow saliency                          higher
jacob_cov       decorrelation of the input Jacobians across images                higher
grad_norm       summed gradient norms of the weights under cross-entropy          higher
fit             top-1 % of the least-squares-fitted network (transfer, below)     higher
fit_loss        its cross-entropy (transfer)                                      lower
logme           LogME evidence of its pooled features (transfer)                  higher
knn             leave-one-out 10-NN top-1 % of its pooled features (transfer)     higher
params          parameter count (baseline)                                        higher
macs            MACs at the input size (baseline)                                 higher
=============== ================================================================= ======

The *transfer* proxies (:mod:`.transfer`) score the network after the search has fitted it in closed form
(``least_squares_init``) on a probe of target images, on other target images; the others score it at its default
initialisation.

Register your own with :func:`register_proxy`; ``fn`` may return a plain float, and then the program, which needs
block terms, orders the candidates by parameters and only the re-ranking uses your score (raise ``--top-k``).
Proxies are scored on a deep copy of the network (BN statistics, gradients and weights of the caller's network are
left alone) after ``torch.manual_seed(seed)``, so a score is a function of the network, the batches and the seed.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ReassemblyError
from . import baselines
from .common import Batch, target_batches
from .grad_norm import grad_norm
from .jacob_cov import jacob_cov
from .naswot import naswot, naswot_official
from .synflow import synflow
from .transfer import Fitted, fit_accuracy, fit_loss, knn, logme


class ProxyError(ReassemblyError):
    """An unknown proxy, or a proxy that failed on a network."""


@dataclass(frozen=True)
class Proxy:
    """A registered proxy. ``resource``: the proxy *is* that resource's total (``params``/``macs``), so the program
    optimises it exactly. ``needs_data``: whether it reads the images (synflow and the baselines do not)."""

    name: str
    function: Callable
    higher_is_better: bool = True
    description: str = ""
    resource: str | None = None
    needs_data: bool = True
    fitted: bool = False  # scored after the search's least-squares fit of the network (transferability proxies)

    @property
    def decomposes(self) -> bool:
        """Whether the function takes ``parts`` (and so can give block terms)."""
        try:
            parameters = inspect.signature(self.function).parameters.values()
        except (TypeError, ValueError):
            return False
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters)

    @property
    def sign(self) -> float:
        return 1.0 if self.higher_is_better else -1.0

    def _run(self, net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None, seed: int):
        if not batches:
            raise ProxyError(f"proxy {self.name} needs at least one batch of target images")
        torch.manual_seed(seed)
        if parts:  # copy the network and its parts together, so the copies of the parts are parts of the copy
            net, parts = copy.deepcopy((net, list(parts)))
        else:
            net = copy.deepcopy(net)
        try:
            if self.fitted:
                result = self.function(Fitted.of(net, batches))
            else:
                result = self.function(net, batches, parts) if parts else self.function(net, batches)
        except ReassemblyError:
            raise
        except Exception as exc:  # a user's proxy or an unusual network: say which and why
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ProxyError(f"proxy {self.name} failed on {type(net).__name__}: {first}") from exc
        if isinstance(result, tuple):
            score, terms = result
        else:
            score, terms = result, None
        return float(score), terms

    def score(self, net: nn.Module, batches: list[Batch], seed: int = 0) -> float:
        """The proxy's score of ``net`` (NaN is reported as -inf for a higher-is-better proxy, +inf otherwise)."""
        value = self._run(net, batches, None, seed)[0]
        return value if not math.isnan(value) else -math.inf * self.sign

    def score_fitted(self, fitted: Fitted) -> float:
        """A transfer proxy's score of a fitted network's features and logits (NaN as in :meth:`score`)."""
        if not self.fitted:
            raise ProxyError(f"proxy {self.name} scores a network, not its fitted features")
        value = float(self.function(fitted))
        return value if not math.isnan(value) else -math.inf * self.sign

    def block_terms(self, net: nn.Module, batches: list[Batch], parts: list[nn.Module], seed: int = 0
                    ) -> list[float] | None:
        """Block terms of ``parts`` (submodules of ``net``), or ``None`` when the proxy gives none."""
        terms = self._run(net, batches, parts, seed)[1]
        if terms is None:
            return None
        if len(terms) != len(parts):
            raise ProxyError(f"proxy {self.name} gave {len(terms)} block terms for {len(parts)} blocks")
        return [float(t) for t in terms]


PROXIES: dict[str, Proxy] = {}


def register_proxy(name: str, function: Callable, *, higher_is_better: bool = True, description: str = "",
                   resource: str | None = None, needs_data: bool = True, fitted: bool = False,
                   overwrite: bool = False) -> Proxy:
    """Add a proxy under ``name``: ``function(net, batches)`` returns a score, or ``function(net, batches, parts)``
    returns ``(score, block_terms)``; with ``fitted=True``, ``function(fitted)`` scores a
    :class:`~.transfer.Fitted` (pooled features, logits, labels of target images outside the probe the search
    fitted the network on in closed form), as the transferability proxies do. Use it with ``search(..., proxy=name)`` or ``reassembly search --proxy
    MODULE:FUNCTION`` (which registers the function on the fly)."""
    if name in PROXIES and not overwrite:
        raise ProxyError(f"a proxy named {name!r} is already registered; pass overwrite=True to replace it")
    proxy = Proxy(name, function, higher_is_better, description, resource, needs_data, fitted)
    PROXIES[name] = proxy
    return proxy


def get_proxy(name: str) -> Proxy:
    """A registered proxy, or ``MODULE:FUNCTION`` imported and registered under that name."""
    if name in PROXIES:
        return PROXIES[name]
    if ":" in name:
        import importlib

        module_name, _, attribute = name.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ProxyError(f"cannot import proxy {name!r}: {exc}") from None
        return register_proxy(name, function, description=f"user proxy {name}")
    from ...errors import did_you_mean

    raise ProxyError(f"unknown proxy {name!r}{did_you_mean(name, PROXIES)} (registered: {', '.join(PROXIES)}; or give "
                     "MODULE:FUNCTION)")


def available_proxies() -> list[str]:
    return list(PROXIES)


register_proxy("naswot", naswot, description="log det of the binary activation-code kernel (NASWOT, DeRy's proxy)")
register_proxy("naswot_official", naswot_official,
               description="naswot also coding nn.Linear, attention and nn.Dropout outputs, as the official DeRy code")
register_proxy("synflow", synflow, description="log of the summed synaptic-flow saliency", needs_data=False)
register_proxy("jacob_cov", jacob_cov, description="decorrelation of the input Jacobians across images")
register_proxy("grad_norm", grad_norm, description="summed gradient norms of the weights under cross-entropy")
register_proxy("fit", fit_accuracy, fitted=True,
               description="top-1 % of the least-squares-fitted network on target images outside its probe")
register_proxy("fit_loss", fit_loss, fitted=True, higher_is_better=False,
               description="cross-entropy of the least-squares-fitted network on target images outside its probe")
register_proxy("logme", logme, fitted=True,
               description="LogME evidence of the labels given the fitted network's pooled features")
register_proxy("knn", knn, fitted=True,
               description="leave-one-out 10-NN top-1 % on the fitted network's pooled features")
register_proxy("params", baselines.params, description="parameter count (baseline)", resource="params",
               needs_data=False)
register_proxy("macs", baselines.macs, description="MACs at the input size (baseline)", resource="macs",
               needs_data=False)

__all__ = ["PROXIES", "Batch", "Fitted", "Proxy", "ProxyError", "available_proxies", "get_proxy", "register_proxy",
           "target_batches"]
