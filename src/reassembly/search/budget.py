"""Budgets: bounds on a reassembled network's parameters, MACs and measured CPU latency, and human-readable sizes.

A :class:`Budget` holds, per resource, an optional minimum and maximum. Parameters count every parameter of the whole
network (stem, blocks, stitches, head); MACs are multiply-accumulates of one image at the network's input size (the
first block's training size), as :func:`reassembly.measure.count_macs` counts them; latency is the median wall time of
one eval-mode forward pass of one image on this machine's CPU, in milliseconds. The minimums exist because the
official searches used them: proxies such as NASWOT grow with the number of units, so without a floor the search
drifts to the cap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ReassemblyError

RESOURCES = ("params", "macs", "latency")
UNITS = {"params": "parameters", "macs": "MACs", "latency": "ms latency"}
OPTIONS = {("params", "max"): "--params", ("params", "min"): "--min-params", ("macs", "max"): "--macs",
           ("macs", "min"): "--min-macs", ("latency", "max"): "--latency", ("latency", "min"): "--min-latency"}

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)\s*$")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|us|µs|s)?\s*$")
_TIME_SCALE = {None: 1.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}


class BudgetError(ReassemblyError):
    """A budget that cannot be read, or that no network of the search space meets."""


def parse_count(text: str | float, what: str = "count") -> int:
    """``'0.5M'`` -> 500000, ``'60M'``, ``'1.2G'``, ``'250k'``, ``'3e5'`` or a plain number (K, M, G, T are
    powers of 1000, either case)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _COUNT.match(str(text))
        if not match:
            raise BudgetError(f"cannot read {what} {text!r}: write a number with an optional K, M or G, e.g. 0.5M")
        value = float(match.group(1)) * _SCALE[match.group(2).lower()]
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"{what} {text!r} must be a non-negative number")
    return round(value)


def parse_latency(text: str | float) -> float:
    """``'2.5ms'`` -> 2.5, ``'800us'`` -> 0.8, ``'0.01s'`` -> 10.0; a plain number is milliseconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _TIME.match(str(text))
        if not match:
            raise BudgetError(f"cannot read latency {text!r}: write a time such as 2.5ms, 800us or 0.01s")
        value = float(match.group(1)) * _TIME_SCALE[match.group(2)]
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"latency {text!r} must be a non-negative time")
    return value


def format_amount(resource: str, value: float) -> str:
    """``format_amount('params', 512000)`` -> ``'512.00K parameters'``."""
    if resource == "latency":
        return f"{value:.3g} ms latency"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit} {UNITS[resource]}"
    return f"{round(value)} {UNITS[resource]}"


@dataclass(frozen=True)
class Budget:
    """Bounds on the whole network; ``None`` means unbounded. Latency is in milliseconds."""

    max_params: int | None = None
    max_macs: int | None = None
    max_latency: float | None = None
    min_params: int | None = None
    min_macs: int | None = None
    min_latency: float | None = None

    def __post_init__(self):
        for resource in RESOURCES:
            low, high = self.bounds(resource)
            if low is not None and high is not None and low > high:
                raise BudgetError(f"{OPTIONS[resource, 'min']} {format_amount(resource, low)} is above "
                                  f"{OPTIONS[resource, 'max']} {format_amount(resource, high)}")

    @classmethod
    def parse(cls, params=None, macs=None, latency=None, min_params=None, min_macs=None,
              min_latency=None) -> Budget:
        """From human sizes (``'0.5M'``, ``'60M'``, ``'2.5ms'``); ``None`` leaves a bound open."""
        def count(value, option):
            return None if value is None else parse_count(value, option)

        def time(value):
            return None if value is None else parse_latency(value)

        return cls(count(params, "--params"), count(macs, "--macs"), time(latency), count(min_params, "--min-params"),
                   count(min_macs, "--min-macs"), time(min_latency))

    def bounds(self, resource: str) -> tuple[float | None, float | None]:
        """(minimum, maximum) of ``resource`` (``params``, ``macs`` or ``latency``)."""
        if resource not in RESOURCES:
            raise BudgetError(f"unknown resource {resource!r}; budgets bound {', '.join(RESOURCES)}")
        return getattr(self, f"min_{resource}"), getattr(self, f"max_{resource}")

    @property
    def resources(self) -> tuple[str, ...]:
        """The resources this budget bounds (in :data:`RESOURCES` order)."""
        return tuple(r for r in RESOURCES if self.bounds(r) != (None, None))

    def admits(self, costs: dict[str, float], tolerance: float = 1e-9) -> bool:
        """Whether ``costs`` (resource -> amount) lie within every bound (a missing resource is not checked)."""
        for resource in self.resources:
            if resource not in costs:
                continue
            low, high = self.bounds(resource)
            value = costs[resource]
            slack = tolerance * max(1.0, abs(value))
            if (low is not None and value < low - slack) or (high is not None and value > high + slack):
                return False
        return True

    def describe(self) -> str:
        parts = []
        for resource in self.resources:
            low, high = self.bounds(resource)
            if low is not None and high is not None:
                parts.append(f"{format_amount(resource, low)} to {format_amount(resource, high)}")
            elif high is not None:
                parts.append(f"at most {format_amount(resource, high)}")
            else:
                parts.append(f"at least {format_amount(resource, low)}")
        return ", ".join(parts) or "no budget"

    def to_dict(self) -> dict:
        return {resource: {"min": low, "max": high} for resource in self.resources
                for low, high in [self.bounds(resource)]}
