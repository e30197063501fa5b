"""Build a reassembled network from block specs (``resnet20_cifar5:1-4``), and rebuild its blocks from references.

A spec ``NAME:i-j`` takes nodes ``i .. j-1`` of the chain of the shipped pretrained model ``NAME`` (as
``chain[i:j]``), dissected as the similarity stage dissects it (granularity ``block`` at the model's training size),
so the node numbers of ``partition.json`` can be used as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..data import normalization_of
from ..errors import ReassemblyError
from ..graph import NodeChain, dissect
from .layers import StitchError
from .net import BlockRef, ReassembledNet, fingerprint, plan_network

SPEC = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*-\s*(\d+)\s*$")
GRANULARITY = "block"


@dataclass
class SourceBlock:
    """A block cut from a loaded model: the model's chain, the block module and its reference."""

    chain: NodeChain
    block: nn.Module
    ref: BlockRef

    @property
    def model(self) -> nn.Module:
        return self.chain.model


def parse_blocks(text: str | list[str]) -> list[tuple[str, int, int]]:
    """``'a:0-4, b:3-10'`` (or a list of such items) -> ``[('a', 0, 4), ('b', 3, 10)]``."""
    items = [item for item in (text.split(",") if isinstance(text, str) else text) if item.strip()]
    if not items:
        raise StitchError("no blocks given: list them as NAME:START-STOP, e.g. 'resnet20_cifar5:1-4,vit_cifar5:3-5'")
    parsed = []
    for item in items:
        match = SPEC.match(item)
        if not match:
            raise StitchError(f"cannot read block {item.strip()!r}: write NAME:START-STOP, e.g. resnet20_cifar5:1-4")
        name, start, stop = match.group(1), int(match.group(2)), int(match.group(3))
        if start >= stop:
            raise StitchError(f"block {item.strip()!r} is empty: START must be below STOP (nodes START..STOP-1)")
        parsed.append((name, start, stop))
    return parsed


def cut_block(model: nn.Module, source: str, architecture: str, model_kwargs: dict, input_size, start: int,
              stop: int) -> SourceBlock:
    """Dissect ``model`` and take ``chain[start:stop]``, with the reference that rebuilds it."""
    chain = dissect(model.eval(), input_size, GRANULARITY, name=source)
    if not 0 <= start < stop <= len(chain):
        raise StitchError(
            f"block {source}:{start}-{stop} is outside the chain of {source}, which has nodes 0..{len(chain) - 1} "
            f"({chain[0].name} .. {chain[len(chain) - 1].name}); see `reassembly dissect {source}`"
        )
    ref = BlockRef(source, architecture, dict(model_kwargs), tuple(input_size), GRANULARITY, start, stop,
                   fingerprint(chain), tuple(node.name for node in chain.nodes[start:stop]))
    return SourceBlock(chain, chain[start:stop], ref)


def pretrained_block(name: str, start: int, stop: int, *, pretrained: bool = True) -> SourceBlock:
    """Cut a block out of a fresh copy of the shipped pretrained model ``name``; ``pretrained=False`` cuts it out
    of the same architecture freshly initialised instead (the from-scratch baseline of a reassembled network)."""
    from ..zoo import create_model
    from ..zoo.pretrained import load_manifest

    shipped = {entry.name: entry for entry in load_manifest()}
    if name not in shipped:
        from ..errors import did_you_mean

        raise ReassemblyError(f"no shipped model named {name!r}{did_you_mean(name, shipped)}: blocks come from the "
                              "pretrained zoo "
                              f"({', '.join(sorted(shipped))}; see `reassembly zoo list`)")
    entry = shipped[name]
    model = create_model(name, pretrained=True) if pretrained else create_model(
        entry.architecture, num_classes=entry.num_classes, **entry.model_kwargs)
    kwargs = {"num_classes": entry.num_classes, **entry.model_kwargs}
    size = (entry.channels, entry.image_size, entry.image_size)
    return cut_block(model, name, entry.architecture, kwargs, size, start, stop)


def rebuild_block(ref: BlockRef) -> SourceBlock:
    """Create the block's architecture (random weights), dissect it the same way and check the chain is the one the
    block was cut from; the caller loads the block's own weights."""
    from ..zoo import create_model

    model = create_model(ref.architecture, **ref.model_kwargs)
    rebuilt = cut_block(model, ref.source, ref.architecture, ref.model_kwargs, ref.input_size, ref.start, ref.stop)
    if rebuilt.ref.fingerprint != ref.fingerprint:
        raise StitchError(
            f"block {ref.spec}: {ref.architecture} is no longer dissected into the chain this network was built "
            f"from (fingerprint {rebuilt.ref.fingerprint}, saved {ref.fingerprint}); rebuild it with the library "
            "version that saved it"
        )
    return rebuilt


def build_network(blocks: list[SourceBlock], num_classes: int, *, stem: str = "new", token_pool: str = "mean",
                  input_size=None, classes: list[str] | None = None) -> ReassembledNet:
    """Stitch ``blocks`` (in order) into a :class:`ReassembledNet` with a fresh stem and a head for
    ``num_classes``; the input size and normalisation are those of the first block's model."""
    if not blocks:
        raise StitchError("a reassembled network needs at least one block")
    if num_classes < 1:
        raise StitchError(f"the head needs at least one class, not {num_classes}")
    first = blocks[0]
    size = tuple(input_size or first.ref.input_size)
    mean, std = normalization_of(first.model)
    structure = plan_network([b.chain for b in blocks], [(b.ref.start, b.ref.stop) for b in blocks],
                             [b.block for b in blocks], [b.ref for b in blocks], num_classes, stem=stem,
                             token_pool=token_pool, input_size=size, mean=mean, std=std, classes=classes)
    return ReassembledNet(structure, [b.block for b in blocks])
