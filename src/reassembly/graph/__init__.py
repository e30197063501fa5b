"""Dissection: trace any torch model into a chain of atomic nodes and cut it into runnable blocks.

>>> chain = dissect(model, input_size=(3, 32, 32))          # granularity "block" | "stage" | "fine", or cuts=[...]
>>> chain[3], chain[2:5], chain.to_dict(), verify(chain, model, x)
>>> tap(chain, x)                     # one forward pass: the pooled tensor at every node boundary (point 0..len)
"""

from .chain import NodeChain
from .dissect import dissect
from .errors import DissectionError, RecompositionError, UntraceableModelError
from .nodes import NodeInfo
from .plan import GRANULARITIES
from .taps import tap
from .verify import verify

__all__ = [
    "GRANULARITIES",
    "DissectionError",
    "NodeChain",
    "NodeInfo",
    "RecompositionError",
    "UntraceableModelError",
    "dissect",
    "tap",
    "verify",
]
