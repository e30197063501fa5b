"""The reassembled network: a stem, blocks cut from pretrained models joined by stitches, and a head.

:class:`ReassembledNet` is a plain ``nn.Module``. Each block is a :class:`~reassembly.graph.chain.ChainBlock` cut
from its own instance of its source model (two blocks of one model never share weights), described by a
:class:`BlockRef` that says how to cut it again: architecture, constructor arguments, input size, cut rule, node range
and a fingerprint of the chain. The stem, the stitches and the head are described by plain data, so the whole
network is rebuilt from its structure JSON and its weights (:mod:`reassembly.stitch.io`) without pickle.

Frozen training (DeRy's FZ protocol) trains the stem, stitches and head only; :meth:`ReassembledNet.freeze_blocks`
turns off the blocks' gradients and, by default, keeps their batch-norm statistics fixed (the official code let them
drift in train mode; ``norm="train"`` restores that).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import set_normalization
from ..graph import NodeChain
from ..graph.taps import point_format
from .layers import (
    End,
    Stitch,
    StitchError,
    StitchPlan,
    fold_norm_after,
    grid_of,
    identity_plan,
    plan_stitch,
)

STEM_KINDS = ("new", "none")
TOKEN_POOLS = ("mean", "cls")


@dataclass(frozen=True)
class BlockRef:
    """Where a block comes from and how to cut it again (``nodes`` are the chain's node names, for people)."""

    source: str  # the shipped model (or label) whose weights the block started from
    architecture: str
    model_kwargs: dict
    input_size: tuple[int, int, int]
    granularity: str
    start: int
    stop: int
    fingerprint: str
    nodes: tuple[str, ...] = ()
    cuts: tuple[str, ...] | None = None

    @property
    def spec(self) -> str:
        return f"{self.source}:{self.start}-{self.stop}"

    def to_dict(self) -> dict:
        record = asdict(self)
        record["spec"] = self.spec
        return record

    @classmethod
    def from_dict(cls, record: dict) -> BlockRef:
        fields = {key: record[key] for key in cls.__dataclass_fields__ if key in record}
        fields["input_size"] = tuple(fields["input_size"])
        fields["nodes"] = tuple(fields.get("nodes", ()))
        fields["cuts"] = None if fields.get("cuts") is None else tuple(fields["cuts"])
        return cls(**fields)


def fingerprint(chain: NodeChain) -> str:
    """A short hash of what the chain's nodes are (names, kinds, shapes, layouts, parameter counts): rebuilding a
    block checks that the architecture is still dissected into the same nodes."""
    rows = [[n.name, n.kind, n.in_shape, n.out_shape, n.in_format, n.format, n.params] for n in chain]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def input_end(chain: NodeChain, start: int) -> End:
    node = chain[start]
    return End(point_format(chain, start), node.in_channels or 0, node.in_grid, node.in_prefix_tokens)


def output_end(chain: NodeChain, stop: int) -> End:
    node = chain[stop - 1]
    return End(point_format(chain, stop), node.channels or 0, node.grid, node.prefix_tokens)


def fixed_input(block: nn.Module) -> bool:
    """Whether a chain block runs only at its trained input size (its model read sizes from tensor shapes)."""
    return getattr(block, "fixed_input_shape", None) is not None


@dataclass(frozen=True)
class StemPlan:
    """``new``: a fresh conv (3x3, or patchify when the first block's input is reduced 4x or more) + BN + ReLU that
    makes the first block's input, as DeRy's CIFAR stem; ``none``: the first block starts at its model's input."""

    kind: str
    in_channels: int = 3
    target: End | None = None
    stride: int = 1

    @property
    def kernel(self) -> int:
        return 3 if self.stride <= 2 else self.stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> StemPlan:
        target = record.get("target")
        if target is not None:
            grid = None if target["grid"] is None else tuple(target["grid"])
            target = End(target["format"], target["width"], grid, target["prefix_tokens"])
        return cls(record["kind"], record.get("in_channels", 3), target, record.get("stride", 1))


class Stem(nn.Module):
    """A fresh stem: conv + BN + ReLU to the first block's width and grid, then its layout (tokens, class token)."""

    def __init__(self, plan: StemPlan):
        super().__init__()
        self.plan = plan
        target = plan.target
        self.conv = nn.Conv2d(plan.in_channels, target.width, plan.kernel, stride=plan.stride,
                              padding=plan.kernel // 2 if plan.kernel == 3 else 0, bias=False)
        self.norm = nn.BatchNorm2d(target.width)
        self.act = nn.ReLU()
        if target.format == "tokens" and target.prefix_tokens:
            self.class_token = nn.Parameter(torch.zeros(1, target.prefix_tokens, target.width))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's map before any layout change (what least-squares initialisation fits)."""
        if not self.training:  # BN folded into the conv: one pass over the map
            weight, bias = fold_norm_after(self.conv.weight, self.norm)
            return F.relu(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding), inplace=True)
        return self.act(self.norm(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if self.plan.target.format == "tokens":
            y = y.flatten(2).transpose(1, 2)
            if self.plan.target.prefix_tokens:
                y = torch.cat([self.class_token.expand(y.shape[0], -1, -1), y], dim=1)
        elif self.plan.target.format == "nhwc":
            y = y.permute(0, 2, 3, 1)
        return y


@dataclass(frozen=True)
class HeadPlan:
    """Global pooling of the last block's output (maps averaged; tokens averaged over the patch tokens, or the class
    token) and a linear classifier."""

    source: End
    num_classes: int
    token_pool: str = "mean"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> HeadPlan:
        end = record["source"]
        grid = None if end["grid"] is None else tuple(end["grid"])
        return cls(End(end["format"], end["width"], grid, end["prefix_tokens"]), record["num_classes"],
                   record.get("token_pool", "mean"))


class Head(nn.Module):
    def __init__(self, plan: HeadPlan):
        super().__init__()
        self.plan = plan
        self.fc = nn.Linear(plan.source.width, plan.num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.plan.source.format
        if fmt == "nchw":
            return x.mean(dim=(2, 3))
        if fmt == "nhwc":
            return x.mean(dim=(1, 2))
        if self.plan.token_pool == "cls":
            return x[:, 0]
        return x[:, self.plan.source.prefix_tokens:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


@dataclass
class Structure:
    """The plain-data description of a reassembled network (its structure JSON, less the bookkeeping)."""

    input_size: tuple[int, int, int]
    blocks: list[BlockRef]
    stem: StemPlan
    stitches: list[StitchPlan]
    head: HeadPlan
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "classes": list(self.classes),
            "stem": self.stem.to_dict(),
            "blocks": [block.to_dict() for block in self.blocks],
            "stitches": [plan.to_dict() for plan in self.stitches],
            "head": self.head.to_dict(),
        }

    @classmethod
    def from_dict(cls, record: dict) -> Structure:
        return cls(tuple(record["input_size"]), [BlockRef.from_dict(b) for b in record["blocks"]],
                   StemPlan.from_dict(record["stem"]), [StitchPlan.from_dict(s) for s in record["stitches"]],
                   HeadPlan.from_dict(record["head"]), tuple(record["normalization"]["mean"]),
                   tuple(record["normalization"]["std"]), list(record.get("classes", [])))


class ReassembledNet(nn.Module):
    """stem -> block 0 -> stitch 0 -> block 1 -> ... -> block K-1 -> head."""

    def __init__(self, structure: Structure, blocks: list[nn.Module]):
        super().__init__()
        if len(blocks) != len(structure.blocks) or len(structure.stitches) != len(blocks) - 1:
            raise StitchError(f"a network of {len(blocks)} blocks needs {len(blocks) - 1} stitches, the structure has "
                              f"{len(structure.stitches)}")
        self.structure = structure
        self.stem = Stem(structure.stem) if structure.stem.kind == "new" else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.stitches = nn.ModuleList(Stitch(plan) for plan in structure.stitches)
        self.head = Head(structure.head)
        set_normalization(self, structure.mean, structure.std)
        self.block_norm = "train"  # batch-norm mode of the blocks when the network trains
        self.blocks_frozen = False
        self.train()  # every part in one mode, as for any new module (planning left the blocks in eval mode)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The network's tensor after its last block, before the head."""
        x = self.stem(x)
        for index in range(len(self.blocks)):
            if index:
                x = self.stitches[index - 1](x)
            x = self.blocks[index](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def freeze_blocks(self, frozen: bool = True, norm: str = "eval") -> ReassembledNet:
        """Train only the stem, stitches and head (``frozen``); ``norm`` is the blocks' batch-norm mode while the
        network trains: ``eval`` keeps their pretrained statistics, ``train`` lets them update."""
        if norm not in ("eval", "train"):
            raise StitchError(f"norm must be 'eval' or 'train', not {norm!r}")
        for parameter in self.blocks.parameters():
            parameter.requires_grad_(not frozen)
        self.blocks_frozen, self.block_norm = frozen, norm if frozen else "train"
        return self.train(self.training)

    def train(self, mode: bool = True) -> ReassembledNet:
        super().train(mode)
        if mode and self.block_norm == "eval":
            for block in self.blocks:
                block.eval()
        return self

    @property
    def specs(self) -> list[str]:
        return [ref.spec for ref in self.structure.blocks]

    def parts(self) -> list[tuple[str, str, int]]:
        """``(part, what, parameters)`` for the stem, each block and stitch in order, and the head."""
        from ..measure import count_params

        structure = self.structure
        rows = [("stem", "new conv stem" if structure.stem.kind == "new" else "(the first block's own)",
                 count_params(self.stem))]
        for k, (ref, block) in enumerate(zip(structure.blocks, self.blocks)):
            if k:
                stitch = self.stitches[k - 1]
                rows.append((f"stitch {k - 1}", stitch.extra_repr() if stitch.plan.kind != "identity" else "(none)",
                             count_params(stitch)))
            nodes = f"{ref.nodes[0]}..{ref.nodes[-1]}" if len(ref.nodes) > 1 else ref.nodes[0]
            rows.append((f"block {k}", f"{ref.spec} ({nodes})", count_params(block)))
        rows.append(("head", f"{structure.head.source.format} -> {structure.head.num_classes} classes",
                     count_params(self.head)))
        return rows


def plan_network(chains: list[NodeChain], ranges: list[tuple[int, int]], blocks: list[nn.Module],
                 refs: list[BlockRef], num_classes: int, stem: str = "new", token_pool: str = "mean",
                 input_size: tuple[int, int, int] = (3, 32, 32), mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), classes: list[str] | None = None) -> Structure:
    """Plan the stem, stitches and head for ``blocks`` (``chains[k][start:stop]``) by running a probe input through
    them in turn, so that every stitch sees the grid that actually arrives at ``input_size``."""
    if stem not in STEM_KINDS:
        raise StitchError(f"stem must be one of {', '.join(STEM_KINDS)}, not {stem!r}")
    if token_pool not in TOKEN_POOLS:
        raise StitchError(f"token pooling must be one of {', '.join(TOKEN_POOLS)}, not {token_pool!r}")
    first_chain, (first_start, _) = chains[0], ranges[0]
    if stem == "none" and first_start != 0:
        raise StitchError(f"block {refs[0].spec} starts at node {first_start}, not at its model's input: "
                          "it needs a stem (stem='new')")
    stem_plan = StemPlan("none") if stem == "none" or first_start == 0 else _stem_plan(first_chain, first_start,
                                                                                        refs[0], input_size)
    x = torch.zeros(2, *input_size)
    with torch.no_grad():
        if stem_plan.kind == "new":
            x = Stem(stem_plan).eval()(x)
        plans: list[StitchPlan] = []
        for k, (chain, (start, stop), block) in enumerate(zip(chains, ranges, blocks)):
            if k:
                source = output_end(chains[k - 1], ranges[k - 1][1])
                arriving = grid_of(x, source)
                if refs[k - 1].source == refs[k].source and ranges[k - 1][1] == start:
                    plan = identity_plan(source, arriving)  # the next block continues the same model
                else:
                    plan = plan_stitch(source, input_end(chain, start), arriving, fixed_input(block),
                                       where=f"{refs[k - 1].spec} -> {refs[k].spec}")
                plans.append(plan)
                x = Stitch(plan).eval()(x)
            try:
                x = block.eval()(x)
            except Exception as exc:  # noqa: BLE001 - any failure here is a shape no stitch could repair
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise StitchError(f"block {refs[k].spec} cannot run on the tensor arriving at it "
                                  f"({tuple(x.shape[1:])}): {message}") from None
    last = output_end(chains[-1], ranges[-1][1])
    if not (last.is_map or last.format == "tokens"):
        raise StitchError(f"block {refs[-1].spec} ends in {last.describe()}: end it before its model's head")
    if token_pool == "cls" and last.format == "tokens" and last.prefix_tokens < 1:
        raise StitchError(f"block {refs[-1].spec} gives tokens without a class token: use token pooling 'mean'")
    head = HeadPlan(last, num_classes, token_pool)
    return Structure(tuple(input_size), list(refs), stem_plan, plans, head, tuple(mean), tuple(std),
                     list(classes or []))


def _stem_plan(chain: NodeChain, start: int, ref: BlockRef, input_size) -> StemPlan:
    target = input_end(chain, start)
    if not (target.is_map or target.format == "tokens") or target.grid is None:
        raise StitchError(f"block {ref.spec} takes {target.describe()}; a stem can only make a feature map or tokens")
    ratio = input_size[1] / target.grid[0]
    stride = 2 ** math.floor(math.log2(ratio)) if ratio >= 2 else 1
    return StemPlan("new", input_size[0], target, stride)
