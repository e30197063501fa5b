"""How a least-squares-initialised network behaves in train mode against eval mode, on images it was not fitted on.

The least-squares initialisation fits the stem, stitches and head on probe images (1,000 seeded training images by
default) with every pretrained block's batch-norm in eval mode, using the running statistics of its source data.
Full fine-tuning runs in train mode, where batch-norm normalises by each batch's own statistics. This prints, for
each saved network and on training images outside its probe (shuffled, so batches mix classes as in training):
cross-entropy and top-1 in eval mode and in train mode (batches of 128, statistics not updated), the same in eval
mode on the probe itself (how far the fit overfits it), and the norm of the head's weight.

With ``--recalibrate`` it also tries one candidate repair: re-estimate every batch-norm's running statistics on the
probe, refit the head on it (``least_squares_init(parts=("head",))``), and measure again outside the probe. No test
image is used.

    python benchmarks/stitch_mode_gap.py runs/split-table-1.5M/nets/dery --recalibrate
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from common import reestimate_batch_norm


@torch.no_grad()
def score(net, images: torch.Tensor, labels: torch.Tensor, train_mode: bool, batch: int = 128) -> dict:
    """Mean cross-entropy and top-1 (%) of ``net`` on normalised ``images``; the network itself is left unchanged."""
    model = copy.deepcopy(net).train(train_mode)
    loss = correct = 0.0
    for first in range(0, len(images), batch):
        logits = model(images[first:first + batch])
        target = labels[first:first + batch]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return {"loss": round(loss / len(images), 3), "top1": round(100 * correct / len(images), 1)}


def measure(net, probe, held) -> dict:
    """``probe`` and ``held`` are (normalised images, labels)."""
    return {"held_eval": score(net, *held, False), "held_train_mode": score(net, *held, True),
            "probe_eval": score(net, *probe, False),
            "head_weight_norm": round(float(net.head.fc.weight.detach().norm()), 1)}


def recalibrate(net, blocks, probe) -> None:
    """Batch-norm running statistics re-estimated on the ``probe`` dataset, then the head refitted on it."""
    from reassembly.stitch.init import least_squares_init

    reestimate_batch_norm(net, probe, batch_size=128)
    least_squares_init(net, blocks, probe.images, probe.labels.long(), parts=("head",), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nets", nargs="+", type=Path, help="least-squares-initialised network directories")
    parser.add_argument("--images", type=int, default=1000, help="training images outside the probe to measure on")
    parser.add_argument("--max-per-class", type=int, default=1000, help="the training subset the network was fitted "
                        "on (`reassembly stitch --max-per-class`)")
    parser.add_argument("--recalibrate", action="store_true", help="also try the batch-norm recalibration repair")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from reassembly.data import Preprocess, load_dataset
    from reassembly.stitch import parse_blocks, pretrained_block
    from reassembly.stitch.io import load_net
    from reassembly.stitch.stage import probe_split
    from reassembly.train.evaluate import resolve_normalization

    for directory in args.nets:
        info = json.loads((directory / "structure.json").read_text())["info"]
        probe_info = info["init"]["probe"]
        train = load_dataset(info["data"], "train", max_per_class=args.max_per_class, seed=0)
        probe_ids, held_ids = probe_split(len(train), probe_info["images"], probe_info["seed"])
        held_ids = held_ids[:args.images]
        net = load_net(directory)
        preprocess = Preprocess(*resolve_normalization(net, None, None))
        probe = preprocess(train.images[probe_ids]), train.labels[probe_ids].long()
        held = preprocess(train.images[held_ids]), train.labels[held_ids].long()
        record = {"net": str(directory), "blocks": info["blocks"], "probe_images": len(probe_ids),
                  "held_images": len(held_ids), "as_saved": measure(net, probe, held)}
        if args.recalibrate:
            blocks = [pretrained_block(n, a, b) for n, a, b in parse_blocks(info["blocks"])]
            recalibrate(net, blocks, train.subset(probe_ids))
            record["recalibrated"] = measure(net, probe, held)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
