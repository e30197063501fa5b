"""Errors raised while dissecting a model; each names the module, node or cut at fault and what to do."""

from __future__ import annotations

from ..errors import ReassemblyError


class DissectionError(ReassemblyError):
    """A model, an input size or a list of cut points that cannot be turned into a node chain."""


class UntraceableModelError(DissectionError):
    """torch.fx could not trace the model; ``module_path`` is the innermost module whose forward failed."""

    def __init__(self, message: str, module_path: str):
        super().__init__(message)
        self.module_path = module_path


class RecompositionError(DissectionError):
    """Running the chain's blocks in order does not reproduce the model, or a block's shapes differ from the record."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (torch.fx appends the failing graph node and advice below it)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
