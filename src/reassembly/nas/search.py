"""The DARTS search driver: bilevel search on a subset of a dataset's training images, resumable at every epoch.

Reads a dataset's training split (``cifar10`` by default, any spec of :func:`reassembly.load_dataset`, or an
:class:`~reassembly.data.ImageDataset`). ``subset`` images are drawn with the seed and split in two halves: one trains
the weights w, the other (the "validation" half) trains the architecture alpha, as DARTS splits its 50k training
images 25k/25k. The test split is never read. Each step first updates alpha on a validation batch
(:class:`~reassembly.nas.architect.Architect`, first or second order), then w on a training batch (SGD, momentum 0.9,
weight decay 3e-4, gradient clipping at 5, learning rate cosine from 0.025 to 0.001 over the epochs, one value per
epoch). Both halves get random crops and flips, as in DARTS.

Writes into the run directory ``out``:

* ``settings.json``: the resolved settings; a directory holding another search is refused rather than mixed.
* ``state.pt``: after every epoch, the network (weights and alphas), both optimisers and the history (written
  atomically, read back with ``weights_only=True``). Running the same search again resumes after the last finished
  epoch, and continues exactly as an uninterrupted run would: each epoch draws its data order and augmentation from
  a seed derived from (seed, epoch).
* ``log.jsonl``: one line per epoch (losses, accuracies on the two halves, learning rate, seconds, that epoch's
  genotype).
* ``alphas.json``: the operation names and the softmax weights of both cell types at initialisation (epoch 0) and
  after every epoch, each with the genotype derived from them.
* ``genotype.json`` and ``summary.json`` when the last epoch is done; ``genotype.json`` is what
  ``reassembly nas train`` takes.

Default sizes, for 2 CPU cores: 5 cells, C = 8, 3,000 images (1,500 + 1,500), batch 32, 8 epochs, first order:
46 steps per epoch, 368 alpha and 368 weight updates. Measured on this project's shared 2-core CPU with one thread
(smoke runs of 10 steps on CIFAR-10): about 3.6 s of CPU per step for ``darts`` and 5 s for ``extend``, so a whole
search takes about 25 minutes (``darts``) and 35 minutes (``extend``), more in wall time when the machine is busy;
second order costs about 2.3x. On a busy machine use one thread (``--threads 1``): two threads competing with other
processes ran several times slower. With so few steps alpha's Adam learning rate is 3e-3, ten times DARTS's 3e-4
(DARTS takes about 20,000 steps), so that the operation weights can move at all. DARTS's own setting is
``cells=8, channels=16, subset=50000, batch_size=64, epochs=50, arch_lr=3e-4``: about a GPU-day.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from ..data import ImageDataset, Preprocess
from ..errors import ReassemblyError, validation_message
from ..io import atomic_path, exclusive, write_text
from .architect import ORDERS, Architect
from .operations import SANDGLASS_PRIMITIVES, search_space
from .search_network import SearchNetwork


class SearchSettings(BaseModel):
    """Everything that decides a search's result (the device and thread count do not, up to rounding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = "cifar10"
    space: str = "darts"
    epochs: int = 8
    cells: int = 5
    channels: int = 8
    subset: int = 3_000
    train_portion: float = 0.5
    batch_size: int = 32
    order: Literal["first", "second"] = "first"
    seed: int = 0
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-3
    arch_weight_decay: float = 1e-3
    sg_reduction: int = 2


def check_settings(settings: SearchSettings) -> None:
    """One-line errors for settings that cannot make a search, naming the command-line option."""
    search_space(settings.space)
    for name, minimum in (("epochs", 1), ("cells", 3), ("channels", 1), ("subset", 2), ("batch_size", 1),
                          ("sg_reduction", 1)):
        value = getattr(settings, name)
        if value < minimum:
            what = "positive" if minimum == 1 else f"at least {minimum}"
            raise ReassemblyError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    for name in ("lr", "arch_lr", "grad_clip"):
        if getattr(settings, name) <= 0:
            raise ReassemblyError(f"--{name.replace('_', '-')} must be positive, got {getattr(settings, name)}")
    if not 0 < settings.train_portion < 1:
        raise ReassemblyError(f"--train-portion must be between 0 and 1, got {settings.train_portion}")
    uses_sandglass = set(search_space(settings.space)) & set(SANDGLASS_PRIMITIVES)
    if uses_sandglass and settings.channels // settings.sg_reduction < 1:
        raise ReassemblyError(f"--channels {settings.channels} with --sg-reduction {settings.sg_reduction} leaves the "
                              "sandglass operations no hidden channels; widen the network or lower t")
    per_half = min(math.floor(settings.subset * settings.train_portion),
                   settings.subset - math.floor(settings.subset * settings.train_portion))
    if per_half < settings.batch_size:
        raise ReassemblyError(f"--subset {settings.subset} gives {per_half} images to one half, fewer than one batch "
                              f"of {settings.batch_size}; raise --subset or lower --batch-size")


def search(data: str | ImageDataset = "cifar10", out: str | Path = "runs/nas-search", *, data_root=None,
           device: str | None = None, channels_last: bool = True, progress: bool = True,
           stop_after: int | None = None, **settings) -> dict:
    """Run (or resume) a DARTS search in ``out``; returns the summary so far (with ``genotype`` once finished).

    ``settings`` are the fields of :class:`SearchSettings`: ``space`` (``darts``, ``extend``, ``replace``),
    ``epochs``, ``cells``, ``channels``, ``subset``, ``batch_size``, ``order`` (``first``/``second``), ``seed``,
    learning rates and decays, ``sg_reduction`` (the sandglass t). ``stop_after`` returns after that many epochs of
    this call (to split a search over sessions). ``device`` defaults to CUDA when there is one. ``channels_last``
    runs the convolutions in NHWC layout: on CPU the search network's depthwise and dilated convolutions then train
    about 1.7x faster; it changes rounding, not the function."""
    name = data.name if isinstance(data, ImageDataset) else str(data)
    search_space(settings.get("space", "darts"))
    if settings.get("order", "first") not in ORDERS:
        raise ReassemblyError(f"--order must be first or second, not {settings['order']!r}")
    try:
        config = SearchSettings(data=name, **settings)
    except ValidationError as exc:
        raise ReassemblyError(f"invalid search setting {validation_message(exc)}") from None
    check_settings(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "searched"):
        return _search(config, data, out, data_root, device, channels_last, progress, stop_after)


def _check_directory(out: Path, config: SearchSettings) -> None:
    path = out / "settings.json"
    wanted = config.model_dump()
    if path.is_file():
        try:
            found = SearchSettings(**json.loads(path.read_text())).model_dump()
        except (ValueError, TypeError):
            found = None
        if found != wanted:
            raise ReassemblyError(f"{out} holds a search with other settings ({path}); run it again with the same "
                                  "settings to resume it, or choose a new --out directory")
        return
    write_text(path, json.dumps(wanted, indent=2) + "\n")


def split_subset(dataset: ImageDataset, config: SearchSettings) -> tuple[ImageDataset, ImageDataset]:
    """The seeded draw of ``subset`` images, cut into the weight half and the architecture half."""
    if len(dataset) < config.subset:
        raise ReassemblyError(f"--subset {config.subset} asks for more images than {dataset.name} holds "
                              f"({len(dataset)})")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))[: config.subset]
    cut = math.floor(config.subset * config.train_portion)
    return dataset.subset(order[:cut]), dataset.subset(order[cut:])


def channel_statistics(dataset: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of a dataset's images, on the [0, 1] scale."""
    images = dataset.images.float().div_(255)
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def cosine_lr(config: SearchSettings, epoch: int) -> float:
    """The weights' learning rate during ``epoch`` (0-based): cosine from lr to lr_min over the epochs."""
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * epoch / config.epochs))


def _search(config: SearchSettings, data, out: Path, data_root, device, channels_last, progress, stop_after) -> dict:
    from ..data import load_dataset

    _check_directory(out, config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = data if isinstance(data, ImageDataset) else load_dataset(data, "train", root=data_root,
                                                                       image_size=32, channels=3)
    train_half, val_half = split_subset(dataset, config)
    mean, std = channel_statistics(train_half)
    torch.manual_seed(config.seed)
    network = SearchNetwork(config.channels, dataset.num_classes, config.cells, config.space,
                            sg_reduction=config.sg_reduction)
    optimizer = torch.optim.SGD(network.weights(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    architect = Architect(network, optimizer, config.order, lr=config.arch_lr,
                          weight_decay=config.arch_weight_decay)
    history = [_record(network, 0)]
    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        architect.optimizer.load_state_dict(state["arch_optimizer"])
        history = json.loads(state["history"])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    network.to(device=device, memory_format=layout)
    _move_optimizer_state(optimizer, device)
    _move_optimizer_state(architect.optimizer, device)
    done = len(history) - 1
    last = config.epochs if stop_after is None else min(config.epochs, done + stop_after)
    weights = network.weights()
    for epoch in range(done, last):
        lr = cosine_lr(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_seed = config.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        augment = Preprocess(mean, std, augment=True, generator=generator)
        train_order = torch.randperm(len(train_half), generator=generator)
        val_order = torch.randperm(len(val_half), generator=generator)
        steps = min(len(train_half), len(val_half)) // config.batch_size
        network.train()
        started = time.time()
        sums = {"train_loss": 0.0, "train_correct": 0, "arch_loss": 0.0}
        bar = tqdm(range(steps), desc=f"{out.name} epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not progress, leave=False)
        for step in bar:
            batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
            x_train, y_train = _batch(train_half, train_order[batch], augment, device, layout)
            x_val, y_val = _batch(val_half, val_order[batch], augment, device, layout)
            sums["arch_loss"] += architect.step(x_train, y_train, x_val, y_val, xi=lr)
            logits = network(x_train)
            loss = F.cross_entropy(logits, y_train)
            if not torch.isfinite(loss):
                raise ReassemblyError(f"the search in {out} diverged at epoch {epoch + 1} (loss {loss.item()}); "
                                      "lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=weights)
            torch.nn.utils.clip_grad_norm_(weights, config.grad_clip)
            optimizer.step()
            sums["train_loss"] += loss.item()
            sums["train_correct"] += (logits.argmax(1) == y_train).sum().item()
            bar.set_postfix(loss=f"{sums['train_loss'] / (step + 1):.3f}")
        seen = steps * config.batch_size
        val_loss, val_top1 = _evaluate(network, val_half, mean, std, device, layout)
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": sums["train_loss"] / steps,
                 "train_top1": 100 * sums["train_correct"] / seen, "arch_loss": sums["arch_loss"] / steps,
                 "val_loss": val_loss, "val_top1": val_top1, "seconds": round(time.time() - started, 1)}
        history.append({**entry, **_record(network, epoch + 1)})
        _save(out, network, optimizer, architect, history, config)
        if progress:
            tqdm.write(f"{out.name} epoch {epoch + 1}/{config.epochs}: train loss {entry['train_loss']:.3f}, "
                       f"val top-1 {val_top1:.2f} % ({entry['seconds']:.0f} s)")
    return _summary(out, network, history, config)


def _batch(dataset: ImageDataset, indices: torch.Tensor, augment: Preprocess, device: torch.device, layout):
    images, labels = dataset.images[indices].to(device), dataset.labels[indices].to(device)
    return augment(images).contiguous(memory_format=layout), labels


@torch.no_grad()
def _evaluate(network: SearchNetwork, dataset: ImageDataset, mean, std, device, layout, batch_size: int = 256):
    """Loss and top-1 (%) of the search network in eval mode on a dataset."""
    network.eval()
    preprocess = Preprocess(mean, std)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start: start + batch_size].to(device)
        labels = dataset.labels[start: start + batch_size].to(device)
        logits = network(preprocess(images).contiguous(memory_format=layout))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    network.train()
    return loss_sum / len(dataset), 100 * correct / len(dataset)


def _record(network: SearchNetwork, epoch: int) -> dict:
    return {"epoch": epoch, "alphas": network.alphas(), "genotype": network.genotype().to_dict()}


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)


def _save(out: Path, network, optimizer, architect, history: list[dict], config: SearchSettings) -> None:
    state = {"network": {k: v.cpu() for k, v in network.state_dict().items()}, "optimizer": optimizer.state_dict(),
             "arch_optimizer": architect.optimizer.state_dict(), "history": json.dumps(history)}
    with atomic_path(out / "state.pt") as tmp:
        torch.save(state, tmp)
    epochs = [{k: v for k, v in e.items() if k != "alphas"} for e in history[1:]]
    write_text(out / "log.jsonl", "".join(json.dumps(e) + "\n" for e in epochs))
    alphas = {"space": config.space, "primitives": list(network.primitives),
              "history": [{"epoch": e["epoch"], **e["alphas"], "genotype": e["genotype"]} for e in history]}
    write_text(out / "alphas.json", json.dumps(alphas) + "\n")


def _summary(out: Path, network: SearchNetwork, history: list[dict], config: SearchSettings) -> dict:
    summary = {"out": str(out), "epochs": len(history) - 1, "settings": config.model_dump(),
               "search_parameters": sum(p.numel() for p in network.weights()),
               "final": {k: v for k, v in history[-1].items() if k != "alphas"}}
    if len(history) - 1 == config.epochs:
        network.genotype().save(out / "genotype.json")
        summary["genotype"] = network.genotype().to_dict()
        summary["seconds"] = round(sum(e.get("seconds", 0) for e in history), 1)
        write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
