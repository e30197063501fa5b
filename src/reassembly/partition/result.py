"""What the partition takes (:class:`ModelNodes`) and gives (:class:`Partition`, JSON-ready through ``to_dict``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ReassemblyError


class PartitionError(ReassemblyError):
    """Partition inputs or options that cannot be used; the message names the model, pair or option at fault."""


@dataclass(frozen=True)
class ModelNodes:
    """What the partition needs to know of one dissected model."""

    name: str
    body: tuple[int, int]  # chain node indices [first, stop) of the body nodes (stem and head excluded)
    node_params: tuple[int, ...]  # parameters of every chain node (len = chain length), for the size cap in params
    node_names: tuple[str, ...] = ()  # optional, for errors/reporting

    @property
    def points(self) -> int:
        """Feature points of the model: one before every chain node, plus the model output."""
        return len(self.node_params) + 1

    @property
    def body_length(self) -> int:
        return max(0, self.body[1] - self.body[0])


@dataclass(frozen=True)
class EquivalenceSet:
    """Blocks that may stand in for one another, as (model, stage index) pairs; the anchor is one of the members."""

    anchor: tuple[str, int]
    members: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Partition:
    """The best cover-set partition found, the options that produced it, and per-restart diagnostics.

    ``blocks[model]`` lists that model's K blocks in stage order as half-open chain ranges (start, stop) that cover
    its body exactly; ``block_params[model]`` their parameters (from ``ModelNodes.node_params``). ``caps[model]`` is
    the size cap that was enforced (nodes or parameters, per ``size``); models in ``raised_caps`` had a nominal
    parameter cap that admitted no partition and got the smallest one that does. ``sets[j]`` is equivalence set j.
    """

    # configuration
    k: int
    eps: float
    size: str
    stage_aligned: bool
    similarity: str
    restarts: int
    iterations: int
    patience: int
    seed: int
    # result
    score: float
    blocks: dict[str, tuple[tuple[int, int], ...]]
    block_params: dict[str, tuple[int, ...]]
    caps: dict[str, int]
    raised_caps: tuple[str, ...]
    sets: tuple[EquivalenceSet, ...]
    # diagnostics
    restart_scores: tuple[float, ...]
    restart_iterations: tuple[int, ...]
    best_restart: int

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.blocks)

    def set_index(self, model: str, stage: int) -> int:
        """The equivalence set holding block ``stage`` of ``model``."""
        for index, members in enumerate(self.sets):
            if (model, stage) in members.members:
                return index
        raise KeyError(f"no block {stage} of model {model!r} in this partition; models: {list(self.blocks)}")

    def to_dict(self) -> dict:
        """Plain data (lists, ints, floats, str) for ``json.dumps``; per-block records leave room for more fields."""
        set_of = {member: index for index, members in enumerate(self.sets) for member in members.members}
        return {
            "config": {
                "k": self.k, "eps": self.eps, "size": self.size, "stage_aligned": self.stage_aligned,
                "similarity": self.similarity, "restarts": self.restarts, "iterations": self.iterations,
                "patience": self.patience, "seed": self.seed,
            },
            "score": self.score,
            "models": [
                {
                    "name": name,
                    "cap": self.caps[name],
                    "cap_raised": name in self.raised_caps,
                    "blocks": [
                        {"start": start, "stop": stop, "params": params, "set": set_of[name, stage]}
                        for stage, ((start, stop), params) in enumerate(zip(blocks, self.block_params[name]))
                    ],
                }
                for name, blocks in self.blocks.items()
            ],
            "sets": [
                {
                    "anchor": {"model": members.anchor[0], "stage": members.anchor[1]},
                    "members": [{"model": model, "stage": stage} for model, stage in members.members],
                }
                for members in self.sets
            ],
            "restarts": {
                "scores": list(self.restart_scores),
                "iterations": list(self.restart_iterations),
                "best": self.best_restart,
            },
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Partition":
        """Inverse of :meth:`to_dict`; fields added by others (per-block MACs, shapes) are ignored."""
        try:
            config = record["config"]
            models = record["models"]
            return cls(
                k=int(config["k"]), eps=float(config["eps"]), size=str(config["size"]),
                stage_aligned=bool(config["stage_aligned"]), similarity=str(config["similarity"]),
                restarts=int(config["restarts"]), iterations=int(config["iterations"]),
                patience=int(config["patience"]), seed=int(config["seed"]),
                score=float(record["score"]),
                blocks={m["name"]: tuple((int(b["start"]), int(b["stop"])) for b in m["blocks"]) for m in models},
                block_params={m["name"]: tuple(int(b["params"]) for b in m["blocks"]) for m in models},
                caps={m["name"]: int(m["cap"]) for m in models},
                raised_caps=tuple(m["name"] for m in models if m.get("cap_raised")),
                sets=tuple(
                    EquivalenceSet(
                        anchor=(str(s["anchor"]["model"]), int(s["anchor"]["stage"])),
                        members=tuple((str(m["model"]), int(m["stage"])) for m in s["members"]),
                    )
                    for s in record["sets"]
                ),
                restart_scores=tuple(float(v) for v in record["restarts"]["scores"]),
                restart_iterations=tuple(int(v) for v in record["restarts"]["iterations"]),
                best_restart=int(record["restarts"]["best"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PartitionError(
                f"not a partition record ({type(error).__name__}: {error}); write it with Partition.to_dict"
            ) from None
