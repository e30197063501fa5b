"""The third-party CIFAR-10 ResNets on this project's JPEG copy of CIFAR-10: why they score ~81 % here, not ~92 %.

Evaluates each checkpoint of ``../shared/models/akamaster-cifar10-resnet`` on the JPEG test split (what the README's
table shows), then asks where the gap comes from: ResNet-20 on the JPEG *training* split (which it fit almost
perfectly in its original, lossless form), and ResNet-20 after its batch-norm statistics are re-estimated on the
JPEG training images (a cumulative average over one pass, no weight changes), again on the test split. Deterministic;
no seed involved.

    PYTHONPATH=src python benchmarks/third_party_eval.py --out results/third-party
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from common import reestimate_batch_norm, write_report
from torch import nn

import reassembly as ra
from reassembly.train.evaluate import evaluate

CHECKPOINTS = Path("../shared/models/akamaster-cifar10-resnet")
MODELS = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet32": "resnet32-d509ac18.th"}


def recorded_accuracy(name: str, folder: Path) -> float:
    """The test accuracy the checkpoint's author stored beside the weights (``best_prec1``, original binary test set)."""
    record = torch.load(folder / MODELS[name], map_location="cpu", weights_only=True)
    return round(float(record["best_prec1"]), 2)


def load(name: str, folder: Path) -> nn.Module:
    return ra.create_model(name, checkpoint=str(folder / MODELS[name])).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="directory for results.json + report.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    test, train = ra.load_dataset("cifar10", "test"), ra.load_dataset("cifar10", "train")
    rows = []
    for name in MODELS:
        result = evaluate(load(name, args.checkpoints), test, progress=False)
        rows.append({"model": name, "evaluated": "test split", "top1": round(result.top1, 2),
                     "recorded": recorded_accuracy(name, args.checkpoints)})
        print(rows[-1], flush=True)
    resnet20 = load("cifar_resnet20", args.checkpoints)
    rows.append({"model": "cifar_resnet20", "evaluated": "training split",
                 "top1": round(evaluate(resnet20, train, progress=False).top1, 2)})
    reestimate_batch_norm(resnet20, train)
    rows.append({"model": "cifar_resnet20", "evaluated": "test split, batch norm re-estimated on the JPEG training split",
                 "top1": round(evaluate(resnet20, test, progress=False).top1, 2)})
    record = {"command": "PYTHONPATH=src python benchmarks/third_party_eval.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"2-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                         f"{args.threads} thread(s)",
              "checkpoints": {name: str(args.checkpoints / file) for name, file in MODELS.items()}, "rows": rows}
    lines = ["# Third-party CIFAR-10 ResNets on the JPEG copy of CIFAR-10", "",
             f"Command: `{record['command']}`  ", f"Machine: {record['machine']}; deterministic, no seed.", "",
             "| model | evaluated on | top-1 % here | recorded in the checkpoint (`best_prec1`, original test set) |",
             "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['evaluated']} | {r['top1']} | {r.get('recorded', '')} |" for r in rows]
    write_report(args.out, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
