"""The stitch stage: block specs + target data -> a saved, initialised reassembled network (``reassembly stitch``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import ReassemblyError
from .build import build_network, parse_blocks, pretrained_block
from .init import HEADS, least_squares_init
from .io import is_net_dir, save_net

INITS = ("least-squares", "default")


def probe_split(num_images: int, probe_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training images the least-squares fit sees (a seeded draw of ``probe_size``) and of the rest,
    in drawn order: one definition, so that tools that study the fit find the same probe and images outside it."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[:probe_size], order[probe_size:]


def stitch_stage(blocks: str | list[str], data: str, out: str | Path, *, init: str = "least-squares",
                 probe_size: int = 1000, seed: int = 0, stem: str = "new", token_pool: str = "mean",
                 max_per_class: int | None = None, data_root=None, recalibrate_norms: bool | None = None,
                 head: str = "fit", overwrite: bool = False, progress: bool = True) -> dict:
    """Cut the blocks out of the shipped pretrained models, stitch them into a network for the classes of ``data``,
    initialise it (least squares on ``probe_size`` seeded training images of ``data``, or PyTorch's defaults) and
    save it into ``out``. ``max_per_class`` restricts the training split as training will (a seeded draw), so the
    fit sees only target data the network may be trained on. ``recalibrate_norms`` (default: with least squares)
    and ``head`` are the least-squares options of :func:`~reassembly.stitch.init.least_squares_init`. Returns the
    saved structure's summary."""
    from ..data import load_dataset

    if init not in INITS:
        raise ReassemblyError(f"init must be one of {', '.join(INITS)}, not {init!r}")
    if recalibrate_norms is None:  # the default: part of the least-squares fit (results/init-study)
        recalibrate_norms = init == "least-squares"
    if recalibrate_norms and init != "least-squares":
        raise ReassemblyError("--recalibrate-norms is part of the least-squares initialisation; drop it or use "
                              "--init least-squares")
    if head != "fit" and init != "least-squares":
        raise ReassemblyError(f"--head {head} is part of the least-squares initialisation; drop it or use "
                              "--init least-squares")
    if head not in HEADS:
        raise ReassemblyError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if probe_size < 1:
        raise ReassemblyError(f"--probe-size {probe_size} leaves no images to initialise the stitches with")
    out = Path(out)
    if is_net_dir(out) and not overwrite:
        raise ReassemblyError(f"{out} already holds a network; choose another --out or pass --overwrite")
    started = time.time()
    specs = parse_blocks(blocks)
    sources = [pretrained_block(name, start, stop) for name, start, stop in specs]
    channels, size = sources[0].ref.input_size[0], sources[0].ref.input_size[1]
    train = load_dataset(data, "train", root=data_root, image_size=size, channels=channels,
                         max_per_class=max_per_class, seed=0)  # the subset training uses
    if train.num_classes < 2:
        raise ReassemblyError(f"{train.name} holds one class ({train.classes[0]}): a classifier needs at least two; "
                              f"select more, e.g. {train.name.split('[')[0]}[0:5]")
    torch.manual_seed(seed)  # the default initialisation of the stem, stitches and head
    net = build_network(sources, train.num_classes, stem=stem, token_pool=token_pool, classes=list(train.classes))
    report: dict = {"method": init}
    if init == "least-squares":
        if len(train) == 0:
            raise ReassemblyError(f"{train.name} train holds no images to initialise the stitches with")
        probe = train.subset(probe_split(len(train), probe_size, seed)[0])
        report.update(least_squares_init(net, sources, probe.images, probe.labels,
                                         recalibrate_norms=recalibrate_norms, head=head, progress=progress))
        report["probe"] = {"data": train.name, "split": "train", "images": len(probe), "seed": seed}
    info = {"blocks": [ref.spec for ref in net.structure.blocks], "data": train.name, "init": report, "seed": seed,
            "seconds": round(time.time() - started, 1)}
    save_net(net, out, info)
    return {"out": str(out), "net": net, **info}
