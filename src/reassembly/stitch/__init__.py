"""Stitching blocks of different pretrained models into one network (DeRy stage 2).

>>> blocks = [pretrained_block(name, i, j) for name, i, j in parse_blocks("resnet20_cifar5:1-4,vit_cifar5:3-5")]
>>> net = build_network(blocks, num_classes=5)
"""

from .build import (
    SourceBlock,
    build_network,
    cut_block,
    parse_blocks,
    pretrained_block,
    rebuild_block,
)
from .layers import End, Stitch, StitchError, StitchPlan, plan_stitch
from .net import BlockRef, ReassembledNet, Structure

__all__ = [
    "BlockRef",
    "End",
    "ReassembledNet",
    "SourceBlock",
    "Stitch",
    "StitchError",
    "StitchPlan",
    "Structure",
    "build_network",
    "cut_block",
    "parse_blocks",
    "plan_stitch",
    "pretrained_block",
    "rebuild_block",
]
