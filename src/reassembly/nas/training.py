"""Train the evaluation network of a genotype from scratch and evaluate it: the second half of a DARTS experiment.

Reads a genotype (a name such as ``DARTS_V2``, a search's ``genotype.json``, or a :class:`Genotype`) and a dataset
spec. Writes into the run directory ``out`` ``network.json`` (what rebuilds the network: the genotype, cells,
channels, classes, drop path, and the normalisation it was trained with) and everything
:func:`reassembly.train.train_classifier` writes (``recipe.json``, ``state.pt`` after every epoch, ``log.jsonl``, and
``final.safetensors`` + ``summary.json`` when done). Running the same command again resumes an unfinished run;
:func:`load_network` rebuilds the trained network from the directory.

The recipe is DARTS's evaluation recipe at a small scale: SGD (momentum 0.9, no Nesterov), lr 0.025 cosine, weight
decay 3e-4 on every parameter, gradient clipping at 5, batch 96, random crops and flips. Default size for the CPU:
8 cells, C = 16, 10 epochs on 10,000 training images, the whole test split evaluated after every epoch (DARTS:
20 cells, C = 36, 600 epochs on all 50,000, with cutout, drop path 0.2 and an auxiliary head of weight 0.4). A step
of 96 images of DARTS_V2 at that size (246,106 parameters) took about 2.1 s on one thread of this project's 2-core
CPU, so a default run takes about 50 minutes with its evaluations; all of CIFAR-10 (``subset=50000``) about five
times that. Deviations of this driver: no cutout and no auxiliary loss (the shared
training loop trains on one logits tensor and crops and flips only); drop path is off by default (``drop_path=0.2``
ramps it up linearly over the run, as DARTS does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..data import ImageDataset
from ..errors import ReassemblyError
from ..io import write_text
from ..train import TrainRecipe, train_classifier
from .genotypes import Genotype, load_genotype
from .network import NetworkCIFAR, count_parameters, network_from_structure
from .search import channel_statistics

RECIPE = TrainRecipe(epochs=10, batch_size=96, optimizer="sgd", lr=0.025, momentum=0.9, nesterov=False,
                     weight_decay=3e-4, decay_norm_and_bias=True, grad_clip=5.0)


def train(genotype: str | Path | Genotype, data: str | ImageDataset = "cifar10", out: str | Path = "runs/nas-train",
          *, test_data: ImageDataset | None = None, cells: int = 8, channels: int = 16, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, drop_path: float = 0.0,
          subset: int | None = 10_000, seed: int = 0, sg_reduction: int | None = None, data_root=None,
          progress: bool = True, stop_after: int | None = None, channels_last: bool = True) -> dict:
    """Train the network of ``genotype`` on ``data`` (train split; the test split is evaluated after every epoch).

    ``subset`` trains on a seeded draw of at most that many training images (the same draw for every seed of the
    recipe: it is drawn with seed 0); ``None`` trains on all of them. ``epochs``, ``batch_size`` and ``lr`` override :data:`RECIPE`. ``sg_reduction``
    overrides the genotype's sandglass t. Returns the training summary with the network's parameter count."""
    from ..data import load_dataset

    genotype = load_genotype(genotype)
    for name, value in (("cells", cells), ("channels", channels), ("epochs", epochs), ("batch-size", batch_size),
                        ("subset", subset), ("sg-reduction", sg_reduction)):
        if value is not None and value < 1:
            raise ReassemblyError(f"--{name} must be positive, got {value}")
    if lr is not None and lr <= 0:
        raise ReassemblyError(f"--lr must be positive, got {lr}")
    updates = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    recipe = TrainRecipe(**{**RECIPE.model_dump(), **updates})
    if isinstance(data, ImageDataset):
        train_set, test_set = data, test_data
    else:
        train_set = load_dataset(data, "train", root=data_root, image_size=32, channels=3)
        test_set = load_dataset(data, "test", root=data_root, image_size=32, channels=3)
    if subset is not None and subset < len(train_set):
        draw = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:subset]
        train_set = train_set.subset(draw)
    mean, std = channel_statistics(train_set)
    ramp = recipe.epochs * math.ceil(len(train_set) / recipe.batch_size) if drop_path else 0
    torch.manual_seed(seed)
    network = NetworkCIFAR(genotype, channels, train_set.num_classes, cells, drop_path=drop_path,
                           drop_path_ramp=ramp, sg_reduction=sg_reduction)
    out = Path(out)
    structure = {**network.structure(), "mean": list(mean), "std": list(std), "data": train_set.name,
                 "train_images": len(train_set)}
    _check_structure(out, structure)
    parameters = count_parameters(network)
    metadata = {"network": structure, "parameters": parameters}
    summary = train_classifier(network, train_set, test_set, recipe, out, seed=seed, mean=mean, std=std,
                               metadata=metadata, progress=progress, stop_after=stop_after,
                               channels_last=channels_last)
    return {"out": str(out), "parameters": parameters, **summary}


def _check_structure(out: Path, structure: dict) -> None:
    path = out / "network.json"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(structure)):
            raise ReassemblyError(f"{out} holds a run of another network or data ({path}); resume it with the same "
                                  "genotype and settings, or choose a new --out directory")
        return
    write_text(path, json.dumps(structure, indent=2) + "\n")


def load_network(run_dir: str | Path) -> NetworkCIFAR:
    """The trained network of a finished ``train`` run directory, in eval mode (its normalisation is in
    ``network.json``: ``mean`` and ``std``)."""
    from ..checkpoint import read_state_dict

    run_dir = Path(run_dir)
    path = run_dir / "network.json"
    if not path.is_file():
        raise ReassemblyError(f"{run_dir} holds no network.json; train one with `reassembly nas train`")
    network = network_from_structure(json.loads(path.read_text()), source=str(path))
    weights = run_dir / "final.safetensors"
    if not weights.is_file():
        raise ReassemblyError(f"{run_dir} has not finished training ({weights} is missing); run the same "
                              "`reassembly nas train` command again to resume it")
    tensors, _ = read_state_dict(weights)
    network.load_state_dict(tensors)
    return network.eval()
