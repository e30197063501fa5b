"""The architect: one update of the architecture parameters alpha on a validation batch (DARTS's bilevel step).

First order (``order="first"``) follows the gradient of the validation loss at the current weights,
grad_alpha L_val(w, alpha). Second order (``order="second"``) follows the gradient of the validation loss after a
virtual step of the weights, w' = w - xi * (momentum * buffer + grad_w L_train(w, alpha) + weight_decay * w), which is
the weight optimiser's own SGD step (its momentum buffer and weight decay included):

    grad_alpha L_val(w', alpha) - xi * H v,   v = grad_w' L_val(w', alpha),   H = d2 L_train / (d alpha d w)

with H v by a central difference, [grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)] / (2 eps) and
eps = 0.01 / |v| (``radius``). xi is the weights' current learning rate. (The official code also adds weight_decay * w' to v;
here v is the gradient the formula asks for.) The virtual weights are never written into the network: the
network is called functionally (``torch.func.functional_call``) with them, and with copies of its batch-norm
buffers, so that neither the weights nor the running statistics change. Alpha is then updated by Adam
(lr 3e-4, betas (0.5, 0.999), weight decay 1e-3 by default, as DARTS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import ReassemblyError
from .search_network import SearchNetwork

ORDERS = ("first", "second")


class Architect:
    def __init__(self, network: SearchNetwork, weight_optimizer: torch.optim.Optimizer | None = None,
                 order: str = "first", lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.999),
                 weight_decay: float = 1e-3, radius: float = 0.01):
        if order not in ORDERS:
            raise ReassemblyError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        if order == "second" and weight_optimizer is None:
            raise ValueError("the second-order update needs the weight optimiser (its momentum and weight decay)")
        self.network, self.weight_optimizer, self.order, self.radius = network, weight_optimizer, order, radius
        self.optimizer = torch.optim.Adam(network.arch_parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    def step(self, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
             xi: float) -> float:
        """Update alpha once; returns the validation loss that was differentiated."""
        alphas = self.network.arch_parameters()
        if self.order == "first":
            loss = F.cross_entropy(self.network(val_x), val_y)
            grads = torch.autograd.grad(loss, alphas)
        else:
            loss, grads = self._second_order(train_x, train_y, val_x, val_y, xi)
        self.optimizer.zero_grad(set_to_none=True)
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad.detach()
        self.optimizer.step()
        return loss.item()

    def _virtual_weights(self, params: dict, weights, train_x, train_y, xi):
        """w' = w - xi * (momentum * buffer + grad + weight_decay * w), per the weight optimiser's groups."""
        loss = F.cross_entropy(self._call(params, train_x), train_y)
        grads = torch.autograd.grad(loss, weights)
        settings = {}
        for group in self.weight_optimizer.param_groups:
            for p in group["params"]:
                settings[p] = (group.get("momentum", 0.0), group.get("weight_decay", 0.0))
        stepped = []
        with torch.no_grad():
            for w, g in zip(weights, grads):
                momentum, decay = settings.get(w, (0.0, 0.0))
                direction = g + decay * w
                buffer = self.weight_optimizer.state.get(w, {}).get("momentum_buffer")
                if momentum and buffer is not None:
                    direction = direction + momentum * buffer
                stepped.append((w - xi * direction).requires_grad_())
        return stepped

    def _call(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        buffers = {n: b.clone() for n, b in self.network.named_buffers()}  # keep the running statistics untouched
        return functional_call(self.network, (params, buffers), (x,))

    def _second_order(self, train_x, train_y, val_x, val_y, xi):
        network = self.network
        names, weights = zip(*network.named_weights())
        alphas = network.arch_parameters()
        arch = dict(zip(("alphas_normal", "alphas_reduce"), alphas))
        stepped = self._virtual_weights({**dict(zip(names, weights)), **arch}, weights, train_x, train_y, xi)
        loss = F.cross_entropy(self._call({**dict(zip(names, stepped)), **arch}, val_x), val_y)
        grads = torch.autograd.grad(loss, list(alphas) + stepped)
        alpha_grads, vector = grads[: len(alphas)], grads[len(alphas):]
        norm = torch.sqrt(sum((v * v).sum() for v in vector))
        if norm == 0:
            return loss, alpha_grads
        eps = self.radius / norm
        implicit = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                moved = {n: w + sign * eps * v for n, w, v in zip(names, weights, vector)}
            train_loss = F.cross_entropy(self._call({**moved, **arch}, train_x), train_y)
            implicit.append(torch.autograd.grad(train_loss, alphas))
        return loss, [g - xi * (p - m) / (2 * eps) for g, p, m in zip(alpha_grads, *implicit)]
