"""Genotypes: the discrete cells a DARTS search derives, as data (JSON in, JSON out) and by name.

A genotype holds, for the normal and the reduction cell, two ``(operation, input)`` pairs per intermediate node (the
node's inputs are the cell inputs 0 and 1 and the earlier nodes 2, 3, ...) and which nodes the cell concatenates into
its output. ``sg_reduction`` is the reduction ratio t of any sandglass operation in it. On disk::

    {"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...], "reduce_concat": [2, 3, 4, 5], "sg_reduction": 2}

:func:`derive_genotype` turns architecture weights into a genotype the DARTS way: for each intermediate node keep
the two incoming edges from distinct predecessors whose strongest operation other than ``none`` weighs most, and on
each kept edge that operation; ``none`` is never chosen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ReassemblyError
from ..io import write_text
from .operations import DEFAULT_REDUCTION, OPERATIONS

Edge = tuple[str, int]


class GenotypeError(ReassemblyError):
    """A genotype that cannot be read or does not describe a valid cell."""


@dataclass(frozen=True)
class Genotype:
    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    sg_reduction: int = DEFAULT_REDUCTION

    @property
    def steps(self) -> int:
        """Intermediate nodes per cell."""
        return len(self.normal) // 2

    def operations(self) -> set[str]:
        return {op for op, _ in self.normal + self.reduce}

    def to_dict(self) -> dict:
        return {"normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(e) for e in self.reduce], "reduce_concat": list(self.reduce_concat),
                "sg_reduction": self.sg_reduction}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data, source: str = "genotype") -> Genotype:
        """Validate and build; a fault is a :class:`GenotypeError` naming ``source`` and the key at fault."""
        if not isinstance(data, dict):
            raise GenotypeError(f"{source}: a genotype is a JSON object with keys normal, normal_concat, reduce, "
                                f"reduce_concat; found {type(data).__name__}")
        unknown = sorted(set(data) - {"normal", "normal_concat", "reduce", "reduce_concat", "sg_reduction"})
        if unknown:
            raise GenotypeError(f"{source}: unknown key {unknown[0]!r}; the keys are normal, normal_concat, reduce, "
                                "reduce_concat and optionally sg_reduction")
        cells = {}
        for cell in ("normal", "reduce"):
            edges = _edges(data, cell, source)
            cells[cell] = edges
            cells[f"{cell}_concat"] = _concat(data, f"{cell}_concat", len(edges) // 2, source)
        if len(cells["normal"]) != len(cells["reduce"]):
            raise GenotypeError(f"{source}: 'normal' and 'reduce' must describe cells with the same number of nodes "
                                f"({len(cells['normal']) // 2} and {len(cells['reduce']) // 2})")
        reduction = data.get("sg_reduction", DEFAULT_REDUCTION)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise GenotypeError(f"{source}: key 'sg_reduction' must be a positive integer, got {reduction!r}")
        return cls(sg_reduction=reduction, **cells)

    @classmethod
    def from_json(cls, text: str, source: str = "genotype") -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GenotypeError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                                ) from None
        return cls.from_dict(data, source)

    def describe(self) -> str:
        """One line per cell: each node's two inputs."""
        lines = []
        for cell in ("normal", "reduce"):
            edges = getattr(self, cell)
            nodes = [" + ".join(f"{op}({i})" for op, i in edges[2 * k: 2 * k + 2]) for k in range(self.steps)]
            concat = ",".join(map(str, getattr(self, f"{cell}_concat")))
            lines.append(f"{cell}: " + "; ".join(f"{k + 2} = {n}" for k, n in enumerate(nodes)) + f"; out = [{concat}]")
        return "\n".join(lines)


def _edges(data: dict, key: str, source: str) -> tuple[Edge, ...]:
    if key not in data:
        raise GenotypeError(f"{source}: key {key!r} is missing (a list of [operation, input] pairs, two per node)")
    value = data[key]
    if not isinstance(value, list) or not value or len(value) % 2:
        raise GenotypeError(f"{source}: key {key!r} must be a non-empty list of [operation, input] pairs, two per "
                            "node")
    edges = []
    for n, item in enumerate(value):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], int)):
            raise GenotypeError(f"{source}: {key}[{n}] is {item!r}, not an [operation, input] pair like "
                                "[\"sep_conv_3x3\", 0]")
        op, index = item
        if op not in OPERATIONS:
            raise GenotypeError(f"{source}: {key}[{n}] names unknown operation {op!r}; the operations are "
                                f"{', '.join(OPERATIONS)}")
        if op == "none":
            raise GenotypeError(f"{source}: {key}[{n}] is 'none', which contributes nothing; give each node two "
                                "real inputs")
        node = n // 2 + 2
        if not 0 <= index < node:
            raise GenotypeError(f"{source}: {key}[{n}] takes input {index}, but node {node} can only read the cell "
                                f"inputs 0 and 1 and earlier nodes (0..{node - 1})")
        edges.append((op, index))
    return tuple(edges)


def _concat(data: dict, key: str, steps: int, source: str) -> tuple[int, ...]:
    if key not in data:
        raise GenotypeError(f"{source}: key {key!r} is missing (the nodes concatenated into the cell output, e.g. "
                            f"{list(range(2, steps + 2))})")
    value = data[key]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < steps + 2 for v in value)
            or len(set(value)) != len(value)):
        raise GenotypeError(f"{source}: key {key!r} must list distinct nodes in 0..{steps + 1}, got {value!r}")
    return tuple(value)


def _genotype(normal, reduce, concat=(2, 3, 4, 5)) -> Genotype:
    return Genotype(tuple(normal), tuple(concat), tuple(reduce), tuple(concat))


# The cells of the DARTS paper (Liu et al., ICLR 2019), as published with its code: V1 from the first-order search,
# V2 from the second-order search.
DARTS_V1 = _genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
)
DARTS_V2 = _genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
)
GENOTYPES = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2}


def load_genotype(spec: str | Path | Genotype) -> Genotype:
    """A genotype by name (``DARTS_V1``, ``DARTS_V2``) or from a JSON file (a search's ``genotype.json``)."""
    if isinstance(spec, Genotype):
        return spec
    text = str(spec)
    if text.upper() in GENOTYPES:
        return GENOTYPES[text.upper()]
    path = Path(text)
    if path.is_dir() and (path / "genotype.json").is_file():
        path = path / "genotype.json"
    if not path.is_file():
        from ..errors import did_you_mean

        raise GenotypeError(f"unknown genotype {text!r}{did_you_mean(text, GENOTYPES)} (not a file, and not one of "
                            f"{', '.join(GENOTYPES)})")
    return Genotype.from_json(path.read_text(), source=str(path))


def parse_cell(weights: torch.Tensor, primitives: tuple[str, ...], steps: int = 4) -> tuple[Edge, ...]:
    """Discrete cell from one cell type's operation weights (edges x operations, rows in DARTS edge order).

    For node k (k = 0..steps-1) the rows of its k + 2 incoming edges follow those of node k - 1. An edge's strength
    is its largest weight over the operations other than ``none``; the two strongest edges are kept (strongest
    first, ties to the earlier input), each with its strongest operation other than ``none``."""
    expected = sum(range(2, steps + 2))
    if tuple(weights.shape) != (expected, len(primitives)):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit {steps} nodes ({expected} edges) and "
                         f"{len(primitives)} operations")
    usable = torch.tensor([p != "none" for p in primitives])
    if not usable.any():
        raise ValueError("the operations hold nothing but 'none'")
    masked = weights.detach().float().cpu().masked_fill(~usable, float("-inf"))
    best_weight, best_op = masked.max(dim=1)
    gene, start = [], 0
    for k in range(steps):
        rows = range(start, start + k + 2)
        strongest = sorted(rows, key=lambda r: (-best_weight[r].item(), r))[:2]
        gene += [(primitives[best_op[r].item()], r - start) for r in strongest]
        start += k + 2
    return tuple(gene)


def derive_genotype(alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor, primitives: tuple[str, ...],
                    steps: int = 4, multiplier: int = 4, sg_reduction: int = DEFAULT_REDUCTION) -> Genotype:
    """The genotype of a search network's architecture parameters (softmax over operations, then :func:`parse_cell`);
    the output concatenates the last ``multiplier`` nodes."""
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    normal = parse_cell(torch.softmax(alphas_normal.detach(), dim=-1), primitives, steps)
    reduce = parse_cell(torch.softmax(alphas_reduce.detach(), dim=-1), primitives, steps)
    return Genotype(normal, concat, reduce, concat, sg_reduction)
