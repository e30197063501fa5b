"""Measured CPU latency: the median wall time of eval-mode forward passes, in milliseconds.

Latency depends on the machine, its load and the thread count (``torch.get_num_threads()``), so figures are only
comparable within one run on one machine; the median of several timed passes after a few warm-up passes resists
the occasional slow pass of a busy machine.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def measure_latency(module: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``module(example)`` in eval mode over ``repeats`` timed passes (after ``warmup``
    untimed ones); the module's training flags are restored afterwards."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        for _ in range(warmup):
            module(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(example)
            times.append(time.perf_counter() - start)
    finally:
        for m, training in modes.items():
            m.training = training
    return 1000.0 * statistics.median(times)
