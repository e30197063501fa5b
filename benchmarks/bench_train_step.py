"""Training-step throughput of zoo architectures on this machine: default memory format vs channels_last.

Prints images per second for both formats, measured alternately in one run (the machine is shared and noisy, so
only the ratio in the last column is worth comparing across runs).

    python benchmarks/bench_train_step.py [--threads 1] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from reassembly import create_model

MODELS = [
    ("cifar_resnet20", {}),
    ("cifar_mobilenetv2_075", {}),
    ("cifar_mobilenext_075", {}),
    ("cifar_vgg16_bn", {"width": 0.5, "hidden": [256]}),
    ("cifar_vit_tiny", {}),
]


def step_seconds(model, optimizer, x, y) -> float:
    started = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    print(f"{'model':<24}{'default img/s':>15}{'channels_last img/s':>21}{'ratio':>8}")
    for name, kwargs in MODELS:
        torch.manual_seed(0)
        timings = {}
        setups = {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            model = create_model(name, num_classes=5, **kwargs).to(memory_format=fmt)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
            y = torch.randint(0, 5, (args.batch,))
            step_seconds(model, optimizer, x, y)  # warm-up
            setups[fmt], timings[fmt] = (model, optimizer, x, y), []
        for _ in range(args.repeats):  # alternate, so both formats see the same machine load
            for fmt, setup in setups.items():
                timings[fmt].append(step_seconds(*setup))
        default, last = (args.batch / statistics.median(timings[f]) for f in setups)
        print(f"{name:<24}{default:>15.0f}{last:>21.0f}{last / default:>8.2f}")


if __name__ == "__main__":
    main()
