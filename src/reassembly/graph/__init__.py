"""Dissection: trace any torch model into a chain of atomic nodes and cut it into runnable blocks.

>>> chain = dissect(model, input_size=(3, 32, 32))          # granularity "block" | "stage" | "fine", or cuts=[...]
>>> chain[3], chain[2:5], chain.to_dict(), verify(chain, model, x)
"""

from .chain import NodeChain
from .dissect import dissect
from .errors import DissectionError, RecompositionError, UntraceableModelError
from .nodes import NodeInfo
from .plan import GRANULARITIES
from .verify import verify

__all__ = [
    "GRANULARITIES",
    "DissectionError",
    "NodeChain",
    "NodeInfo",
    "RecompositionError",
    "UntraceableModelError",
    "dissect",
    "verify",
]
