"""What MDA's relative contributions cost: their time over one forward+backward pass on the same samples.

For each model, the same preprocessed CIFAR-10 training images (``--samples``, seeded, labels as given) go through
``reassembly.lego.accumulate_contributions`` (every conv and linear layer, per class, in batches) and through one
plain forward+backward pass (cross-entropy, batches of the same size). The two alternate for ``--rounds`` rounds; the
report gives the median of the per-round ratios and fastest over fastest. The target is at most 3.

    python benchmarks/bench_lego.py [--samples 300] [--rounds 5] [--threads 1] [--out results/lego]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from common import write_report

import reassembly as ra
from reassembly.data import Preprocess
from reassembly.lego import accumulate_contributions
from reassembly.train.evaluate import resolve_normalization

AKAMASTER = "../shared/models/akamaster-cifar10-resnet/resnet20-12fca82f.th"
MODELS = {
    "cifar_resnet20 (third-party)": lambda: ra.create_model("cifar_resnet20", checkpoint=AKAMASTER),
    "vgg16_cifar10": lambda: ra.create_model("vgg16_cifar10", pretrained=True),
    "mobilenetv2_cifar10": lambda: ra.create_model("mobilenetv2_cifar10", pretrained=True),
}


def forward_backward(model, x, labels, batch_size: int) -> None:
    model.zero_grad(set_to_none=True)
    for start in range(0, len(x), batch_size):
        F.cross_entropy(model(x[start:start + batch_size]), labels[start:start + batch_size]).backward()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for report.md and results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = ra.load_dataset("cifar10", "train")
    draw = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.samples]
    rows = {}
    for name, build in MODELS.items():
        model = build().eval()
        x = Preprocess(*resolve_normalization(model, None, None))(train.images[draw])
        labels = train.labels[draw]
        ratios, contribution, plain = [], [], []
        accumulate_contributions(model, x[:args.batch_size], labels[:args.batch_size], 10)  # warm-up
        for _ in range(args.rounds):
            c = timed(lambda: accumulate_contributions(model, x, labels, 10, batch_size=args.batch_size))
            p = timed(lambda: forward_backward(model, x, labels, args.batch_size))
            contribution.append(c)
            plain.append(p)
            ratios.append(c / p)
        rows[name] = {"contribution_s": statistics.median(contribution), "forward_backward_s": statistics.median(plain),
                      "ratio_median": statistics.median(ratios), "ratio_fastest": min(contribution) / min(plain)}
        print(name, rows[name], flush=True)
    record = {"machine": f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s)",
              "samples": args.samples, "batch_size": args.batch_size, "rounds": args.rounds, "models": rows,
              "command": f"python benchmarks/bench_lego.py --samples {args.samples} --rounds {args.rounds} "
                         f"--threads {args.threads}" + (f" --out {args.out}" if args.out else "")}
    lines = ["# Relative contributions against one forward+backward pass", "",
             f"Command: `{record['command']}`; machine: {record['machine']}; {args.samples} CIFAR-10 training images "
             f"(seed 0), batches of {args.batch_size}, {args.rounds} alternating rounds. Target: at most 3.", "",
             "| model | contributions (s) | forward+backward (s) | ratio, median of rounds | fastest / fastest |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['contribution_s']:.3f} | {r['forward_backward_s']:.3f} | "
                     f"{r['ratio_median']:.2f} | {r['ratio_fastest']:.2f} |")
    write_report(args.out, record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
