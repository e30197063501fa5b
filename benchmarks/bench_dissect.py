"""Wall time of ``reassembly.graph.dissect`` on a ~50-block CIFAR ResNet (target: under 2 s on a 2-core CPU).

Prints the first (cold) call, which pays one-off imports and FlopCounterMode set-up, then the median of warm calls
per granularity, the time to build every single-node block and verify the chain, and one bare forward pass of the
same batch for scale.

    python benchmarks/bench_dissect.py [--model cifar_resnet110] [--repeats 5] [--threads 1]

Use ``--threads 1`` on a shared machine: with every core busy, torch's intra-op threads contend and a forward pass
of this model slows from ~15 ms to seconds, which would swamp what dissection itself costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reassembly.graph import dissect, verify
from reassembly.zoo.registry import create_model, model_info


def _seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet110", help="registry name (cifar_resnet110: 54 blocks)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    size = model_info(args.model).input_size

    start = time.perf_counter()
    chain = dissect(model, size)
    cold = time.perf_counter() - start
    print(f"{args.model}: {len(chain)} nodes, {chain.params:,} params, {chain.macs:,} MACs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  dissect (cold, first call)    {cold:7.3f} s")
    for granularity in ("block", "stage", "fine"):
        seconds = _seconds(lambda: dissect(model, size, granularity), args.repeats)
        nodes = len(dissect(model, size, granularity))
        print(f"  dissect granularity={granularity:<6} {seconds:7.3f} s  ({nodes} nodes, median of {args.repeats})")
    x = torch.randn(2, *size)
    print(f"  verify (all blocks)           {_seconds(lambda: verify(chain, model, x), args.repeats):7.3f} s")
    with torch.no_grad():
        print(f"  bare forward, batch 2         {_seconds(lambda: model(x), args.repeats):7.3f} s")


if __name__ == "__main__":
    main()
