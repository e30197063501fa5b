"""Train a saved reassembled network on its target task: DeRy's frozen (FZ) or full fine-tuning (FT) protocol.

The run goes into its own directory (default ``NET/train-MODE``) through :func:`reassembly.train.train_classifier`,
so it checkpoints every epoch, resumes exactly and runs on one CPU or many GPUs through ``accelerate``. When it
finishes, the directory is itself a saved network (``structure.json`` + ``model.safetensors``) that
``reassembly eval --model`` takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ReassemblyError
from ..io import write_text
from ..train import TrainRecipe, train_classifier
from .io import load_net, read_structure, save_net

MODES = ("frozen", "full")
BLOCK_NORMS = ("eval", "train")
HEAD_STARTS = ("zero", "fitted")
# what full fine-tuning starts from: on the Split-CIFAR validation split a zeroed head beat the least-squares one on
# DeRy's and the zoo's networks, with a lower epoch-1 loss (results/init-study); frozen training keeps the fitted head
DEFAULT_HEAD_START = {"full": "zero", "frozen": "fitted"}
# DeRy's transfer recipe scaled to small CPU runs (dery-spec.md section 9): AdamW, cosine, label smoothing 0.1
RECIPE = TrainRecipe(epochs=10, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0.5,
                     label_smoothing=0.1)


def train_network(net_dir: str | Path, data: str, mode: str = "frozen", *, recipe: TrainRecipe = RECIPE,
                  out: str | Path | None = None, seed: int = 0, block_norm: str = "eval",
                  max_per_class: int | None = None, data_root=None, head_start: str | None = None,
                  progress: bool = True, stop_after: int | None = None) -> dict:
    """Train the network saved in ``net_dir`` on ``data`` (its train split; evaluated on its test split).

    ``mode`` ``frozen`` trains the stem, stitches and head only, with the blocks' batch-norm statistics fixed
    (``block_norm="train"`` lets them update, as the official code did); ``full`` trains everything.
    ``max_per_class`` trains on that many images per class (a seeded draw, e.g. 1,000 for Split-CIFAR).
    ``head_start``: ``zero`` zeroes the head before training, ``fitted`` keeps the stitched one (default: zero for
    full fine-tuning, fitted for frozen training; :data:`DEFAULT_HEAD_START`)."""
    from ..data import load_dataset

    if mode not in MODES:
        raise ReassemblyError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    head_start = head_start or DEFAULT_HEAD_START[mode]
    if head_start not in HEAD_STARTS:
        raise ReassemblyError(f"head start must be one of {', '.join(HEAD_STARTS)}, not {head_start!r}")
    if block_norm not in BLOCK_NORMS:
        raise ReassemblyError(f"block batch-norm must be one of {', '.join(BLOCK_NORMS)}, not {block_norm!r}")
    net_dir = Path(net_dir)
    record = read_structure(net_dir)
    out = Path(out) if out is not None else net_dir / f"train-{mode}"
    net = load_net(net_dir)
    channels, size = net.structure.input_size[0], net.structure.input_size[1]
    train_set = load_dataset(data, "train", root=data_root, image_size=size, channels=channels,
                             max_per_class=max_per_class, seed=0)  # one fixed subset for every run
    test_set = load_dataset(data, "test", root=data_root, image_size=size, channels=channels)
    if train_set.num_classes != net.structure.head.num_classes:
        raise ReassemblyError(
            f"the network in {net_dir} classifies {net.structure.head.num_classes} classes but {train_set.name} has "
            f"{train_set.num_classes}; stitch a network for this data with `reassembly stitch --data {data}`"
        )
    _check_origin(out, record["weights"]["sha256"], net_dir)
    if mode == "frozen":
        net.freeze_blocks(norm=block_norm)
    start_head(net, head_start)
    metadata = {"network": str(net_dir), "blocks": net.specs, "mode": mode, "block_norm": block_norm,
                "head_start": head_start,
                "data": train_set.name, "train_images": len(train_set)}
    summary = train_classifier(net, train_set, test_set, recipe, out, seed=seed, metadata=metadata,
                               progress=progress, stop_after=stop_after)
    if summary["epochs"] == recipe.epochs:
        info = {**record.get("info", {}), "trained": {**metadata, "seed": seed, "recipe": recipe.model_dump(),
                                                      "final": summary["final"]}}
        save_net(net, out, info)
    return {"out": str(out), **summary}


def start_head(net, head_start: str) -> None:
    """Zero the head's classifier (``zero``) or leave it as stitched (``fitted``)."""
    if head_start == "zero":
        with torch.no_grad():
            net.head.fc.weight.zero_()
            net.head.fc.bias.zero_()


def _check_origin(out: Path, weights_sha256: str, net_dir: Path) -> None:
    """A run directory belongs to the network it started from: resuming it with another network (re-stitched into
    the same directory, say) would load that run's state into the wrong weights."""
    path = out / "network.sha256"
    if path.is_file():
        if path.read_text().strip() != weights_sha256:
            raise ReassemblyError(f"{out} holds a run started from another network than the one now in {net_dir}; "
                                  "choose another --out, or delete that run")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, weights_sha256 + "\n")
