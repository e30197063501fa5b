"""The search space of a partition: candidate blocks, which pairs can follow one another, and exact costs.

Reads a partition record (``partition.json``) and the shipped pretrained models it names; gives a
:class:`SearchSpace` whose :class:`~.problem.Problem` holds, per position (stage index), the candidate blocks and,
per pair of consecutive positions, whether a stitch may join them and what it costs.

Compatibility rules (a pair or candidate that breaks one is excluded, with the reason kept for error messages):

* **Trained resolution** (spatial reduction consistent with the input size): every block runs on the grid it was
  trained on. The stem must make the first block's input grid from the network's input size, and a stitch must
  bring the previous block's output grid exactly to the next block's input grid, by its stride (a power of two) or
  by the explicit resize a fixed-size block gets. A pair that would feed a block a smaller map than it was trained
  on (stitches never up-sample, as in DeRy) or a size no stride reaches is excluded. Because every block then sees
  its trained grid, each block's output grid is known in advance, every stitch can be planned from the pair alone,
  and a network's parameters and MACs are exactly the sum of its parts' (checked against the assembled network).
* **Stitchable**: :func:`reassembly.stitch.plan_stitch` accepts the pair (its ``StitchError`` excludes it).
* **Order** (``order="dery"``, the default, as the official search): no token (transformer) block before a map
  (CNN) block, and the first block takes a map; our stitches do join tokens to maps and our stem can make tokens,
  so ``order="any"`` lifts both.
* Two consecutive blocks of one model that continue each other (``a:i-j`` then ``a:j-k``) need no stitch: cost 0,
  always allowed.

Costs: a block's parameters and MACs are those ``partition.json`` records (its nodes'); a stitch's, the stem's (for
a first block) and the head's (for a last block, with the target's classes) are counted on the modules
themselves (:func:`~reassembly.measure.count_params`, :func:`~reassembly.measure.count_macs` at the tensor that
reaches them). Latency, when asked for, is measured per part on this CPU and summed (an approximation: the assembled
network's latency is measured again after assembly).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ReassemblyError
from ..measure import count_macs, count_params, measure_latency
from ..stitch import End, SourceBlock, Stitch, StitchError, StitchPlan, plan_stitch
from ..stitch.net import (
    Head,
    HeadPlan,
    Stem,
    StemPlan,
    fixed_input,
    input_end,
    output_end,
)
from .problem import Problem

ORDERS = ("dery", "any")


@dataclass
class SourceModel:
    """A shipped pretrained model as the search uses it: its chain (dissected as ``reassembly stitch`` does), the
    reference of its first node (the template of its blocks' references), and its normalisation."""

    name: str
    block: SourceBlock  # the model's chain[0:1]: chain, model and a reference to derive the others from

    @property
    def chain(self):
        return self.block.chain

    @property
    def model(self):
        return self.block.model

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.block.ref.input_size)

    def normalization(self) -> tuple[tuple, tuple]:
        from ..data import normalization_of

        return normalization_of(self.model)

    def source_block(self, start: int, stop: int) -> SourceBlock:
        """``chain[start:stop]`` with its reference (sharing this model's weights: copy the network to change it)."""
        nodes = tuple(node.name for node in self.chain.nodes[start:stop])
        return SourceBlock(self.chain, self.chain[start:stop],
                           dataclasses.replace(self.block.ref, start=start, stop=stop, nodes=nodes))


def load_source(name: str) -> SourceModel:
    """Load the shipped pretrained model ``name`` and dissect it."""
    from ..stitch import pretrained_block

    return SourceModel(name, pretrained_block(name, 0, 1))


@dataclass
class Candidate:
    """One block of the partition as a candidate for its position."""

    spec: str
    model: str
    start: int
    stop: int
    position: int
    set: int
    params: int
    macs: int
    input: End
    output: End
    fixed: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_size: tuple[int, int, int]  # its model's input size: the network's, when this block comes first

    @property
    def tokens_in(self) -> bool:
        return self.input.format == "tokens"

    @property
    def tokens_out(self) -> bool:
        return self.output.format == "tokens"


@dataclass
class SearchSpace:
    """Candidates per position, the problem over them (objective terms left at 0), and the plans behind it."""

    candidates: list[list[Candidate]]
    problem: Problem
    sources: dict[str, SourceModel]
    num_classes: int
    order: str
    stems: dict[int, StemPlan] = field(default_factory=dict)  # by candidate index at position 0
    stitches: dict[tuple[int, int, int], StitchPlan | None] = field(default_factory=dict)  # None: no stitch
    latency: dict[str, float] = field(default_factory=dict)  # measured part latencies (ms), when asked for

    def source_blocks(self, choice: tuple[int, ...]) -> list[SourceBlock]:
        return [self.sources[c.model].source_block(c.start, c.stop)
                for c in (self.candidates[k][i] for k, i in enumerate(choice))]

    def specs(self, choice: tuple[int, ...]) -> list[str]:
        return [self.candidates[k][i].spec for k, i in enumerate(choice)]

    def index(self, specs: list[str]) -> tuple[int, ...]:
        """The choice of candidates named by ``specs`` (one per position)."""
        lookup = [{c.spec: i for i, c in enumerate(position)} for position in self.candidates]
        try:
            return tuple(lookup[k][spec] for k, spec in enumerate(specs))
        except (KeyError, IndexError):
            raise ReassemblyError(f"{', '.join(specs)} is not one block per position of this partition") from None


def read_candidates(record: dict, sources: dict[str, SourceModel], own_stems: bool = True) -> list[list[Candidate]]:
    """The partition's blocks as candidates, position = stage index in their model, checked against the chains.
    With ``own_stems``, every first block that starts after its model's input also comes as a variant that keeps
    the nodes before it (the model's own stem, ``NAME:0-STOP``), so that a model's own blocks in order are exactly
    that model with a new head: each zoo model within the budget is a candidate of the search."""
    k = int(record["config"]["k"])
    positions: list[list[Candidate]] = [[] for _ in range(k)]
    for model in record["models"]:
        source = sources[model["name"]]
        chain = source.chain
        if len(model["blocks"]) != k:
            raise ReassemblyError(f"partition.json gives {model['name']} {len(model['blocks'])} blocks, not K = {k}")
        for stage, block in enumerate(model["blocks"]):
            start, stop = int(block["start"]), int(block["stop"])
            names = [node.name for node in chain.nodes[start:stop]]
            if "nodes" in block and list(block["nodes"]) != names:
                raise ReassemblyError(
                    f"partition.json's block {model['name']}:{start}-{stop} names nodes {block['nodes']}, but the "
                    f"model is now dissected into {names} there; re-run `reassembly similarity` and `partition`")
            node_in, node_out = chain[start], chain[stop - 1]
            positions[stage].append(Candidate(
                spec=f"{model['name']}:{start}-{stop}", model=model["name"], start=start, stop=stop, position=stage,
                set=int(block["set"]), params=int(block["params"]),
                macs=int(block.get("macs", sum(n.macs for n in chain.nodes[start:stop]))),
                input=input_end(chain, start), output=output_end(chain, stop), fixed=fixed_input(chain[start:stop]),
                in_shape=tuple(node_in.in_shape), out_shape=tuple(node_out.out_shape),
                input_size=source.input_size))
            if own_stems and stage == 0 and start > 0:
                before = chain.nodes[:start]
                positions[0].append(dataclasses.replace(
                    positions[0][-1], spec=f"{model['name']}:0-{stop}", start=0,
                    params=positions[0][-1].params + sum(int(node.params) for node in before),
                    macs=positions[0][-1].macs + sum(int(node.macs) for node in before),
                    input=input_end(chain, 0), fixed=fixed_input(chain[0:stop]), in_shape=tuple(chain[0].in_shape)))
    return positions


def own_model_choice(space: SearchSpace, name: str) -> tuple[int, ...] | None:
    """The choice that is model ``name`` itself (its own stem and every block in order, a new head), if the space
    holds it."""
    lookup = [{(c.model, c.start): i for i, c in enumerate(position)} for position in space.candidates]
    choice, start = [], 0
    for k, position in enumerate(space.candidates):
        index = lookup[k].get((name, start))
        if index is None:
            return None
        choice.append(index)
        start = position[index].stop
    return tuple(choice)


def _first_rule(candidate: Candidate, source: SourceModel, order: str) -> tuple[StemPlan | None, str | None]:
    """The stem for ``candidate`` as the first block, or why it cannot come first."""
    from ..stitch.net import (
        _stem_plan,  # the plan build_network makes, so that its cost is the one counted here
    )

    if order == "dery" and not candidate.input.is_map:
        return None, (f"{candidate.spec} cannot come first under DeRy's order rule (its input is "
                      f"{candidate.input.describe()}, the first block must be a CNN block; --order any allows it)")
    if candidate.start == 0:
        return StemPlan("none"), None
    try:
        plan = _stem_plan(source.chain, candidate.start, source.source_block(candidate.start, candidate.stop).ref,
                          candidate.input_size)
    except StitchError as exc:
        return None, str(exc)
    with torch.no_grad():
        made = Stem(plan).eval().features(torch.zeros(1, *candidate.input_size))
    if tuple(made.shape[-2:]) != tuple(candidate.input.grid):
        return None, (f"{candidate.spec} cannot come first: a stem makes a {made.shape[-2]}x{made.shape[-1]} grid "
                      f"from the {candidate.input_size[1]}x{candidate.input_size[2]} input, the block was trained "
                      f"on {candidate.input.grid[0]}x{candidate.input.grid[1]}")
    return plan, None


def _pair_rule(a: Candidate, b: Candidate, order: str) -> tuple[StitchPlan | None, str | None, bool]:
    """(plan, reason it is excluded, whether no stitch is needed) for ``a`` followed by ``b``."""
    if a.model == b.model and a.stop == b.start:
        return None, None, True
    where = f"{a.spec} -> {b.spec}"
    if order == "dery" and a.tokens_out and b.input.is_map:
        return None, (f"{where}: DeRy's order rule puts no transformer block before a CNN block "
                      "(--order any allows it)"), False
    try:
        plan = plan_stitch(a.output, b.input, a.output.grid, b.fixed, where=where)
    except StitchError as exc:
        return None, str(exc), False
    grid = plan.output_grid()
    if grid is not None and b.input.grid is not None and tuple(grid) != tuple(b.input.grid):
        return None, (f"{where}: {b.spec} was trained on a {b.input.grid[0]}x{b.input.grid[1]} grid but would "
                      f"receive {grid[0]}x{grid[1]} (stitches only shrink maps, by powers of two)"), False
    return plan, None, False


def build_space(record: dict, sources: dict[str, SourceModel], num_classes: int, order: str = "dery",
                latency: bool = False, latency_repeats: int = 20, own_stems: bool = True) -> SearchSpace:
    """Candidates, compatibility and exact costs of the partition ``record`` for a head of ``num_classes``
    (``own_stems``: see :func:`read_candidates`)."""
    if order not in ORDERS:
        raise ReassemblyError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    candidates = read_candidates(record, sources, own_stems)
    positions = len(candidates)
    resources = ("params", "macs", "latency") if latency else ("params", "macs")
    unary = {r: [np.zeros(len(c)) for c in candidates] for r in resources}
    pair = {r: [np.zeros((len(candidates[k]), len(candidates[k + 1]))) for k in range(positions - 1)]
            for r in resources}
    allowed = [np.zeros((len(candidates[k]), len(candidates[k + 1])), dtype=bool) for k in range(positions - 1)]
    usable = [np.ones(len(c), dtype=bool) for c in candidates]
    space = SearchSpace(candidates, None, sources, num_classes, order)  # type: ignore[arg-type]
    reasons: dict[tuple[int, int, int], str] = {}
    unusable: dict[tuple[int, int], str] = {}
    counted: dict = {}

    def cost(module_key, build, shape) -> tuple[float, float, float]:
        if module_key not in counted:
            module = build()
            ms = measure_latency(module, torch.zeros(1, *shape), repeats=latency_repeats) if latency else 0.0
            counted[module_key] = (float(count_params(module)), float(count_macs(module, shape)), ms)
        return counted[module_key]

    for k, position in enumerate(candidates):
        for i, c in enumerate(position):
            unary["params"][k][i] = c.params
            unary["macs"][k][i] = c.macs
            if latency:
                ms = measure_latency(sources[c.model].chain[c.start : c.stop], torch.zeros(1, *c.in_shape),
                                     repeats=latency_repeats)
                space.latency[c.spec] = ms
                unary["latency"][k][i] = ms
            if k == 0:
                plan, reason = _first_rule(c, sources[c.model], order)
                if reason:
                    usable[0][i], unusable[(0, i)] = False, reason
                elif plan.kind == "new":
                    space.stems[i] = plan
                    extra = cost(("stem", plan), lambda plan=plan: Stem(plan), c.input_size)
                    for r, value in zip(resources, extra):
                        unary[r][0][i] += value
            if k == positions - 1:
                head = HeadPlan(c.output, num_classes, "mean")
                extra = cost(("head", head), lambda head=head: Head(head), c.out_shape)
                for r, value in zip(resources, extra):
                    unary[r][k][i] += value
    for k in range(positions - 1):
        for a, first in enumerate(candidates[k]):
            for b, second in enumerate(candidates[k + 1]):
                plan, reason, identity = _pair_rule(first, second, order)
                if reason:
                    reasons[(k, a, b)] = reason
                    continue
                allowed[k][a, b] = True
                space.stitches[(k, a, b)] = plan
                if identity:
                    continue
                extra = cost(("stitch", plan, first.out_shape), lambda plan=plan: Stitch(plan), first.out_shape)
                for r, value in zip(resources, extra):
                    pair[r][k][a, b] = value
    space.problem = Problem(
        labels=[[c.spec for c in position] for position in candidates],
        sets=[np.array([c.set for c in position]) for position in candidates],
        term=[np.zeros(len(position)) for position in candidates],
        allowed=allowed, unary=unary, pair=pair, usable=usable, reasons=reasons, unusable=unusable)
    return space
