"""What stitching costs at inference, and what least-squares initialisation buys before any training.

Latency: the reassembled network's forward pass against the sum of its blocks' forward passes, each block run alone
on the very tensor that reaches it inside the network (so the ratio is what the stem, the stitches, the head and
the composition add). Single passes of the network and of the blocks alternate; the summary gives the median of
the paired ratios and the fastest network pass over the fastest block sum. The target is at most 1.1.

Two networks by default: the issue's example, whose first block keeps its model's own stem, and one whose first
block starts after its model's stem, so a new stem (3x3 conv, BN, ReLU at full resolution: the same work as the
node it replaces) is counted on the overhead side.

Accuracy before training, on the full test split of the target: the same network with
  * ``least-squares``: stem, stitches and head fitted in closed form on ``--probe-size`` training images;
  * ``default + ridge head``: PyTorch's default stem and stitches, the head fitted the same way;
  * ``default``: PyTorch's default everywhere (DeRy's initialisation; the head is random, so this is chance).

    python benchmarks/bench_stitch.py [--blocks SPEC ...] [--data 'cifar10[5:10]'] [--probe-size 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reassembly.data import load_dataset
from reassembly.measure import count_macs, count_params
from reassembly.stitch import build_network, parse_blocks, pretrained_block
from reassembly.stitch.init import least_squares_init
from reassembly.train import evaluate

THREE = "resnet20_cifar5:1-4,mobilenext_cifar5:3-9,vit_cifar5:4-7"  # a new stem replaces resnet20's node 0
OWN_STEM = "resnet20_cifar5:0-4,mobilenext_cifar5:3-10,vit_cifar5:4-7"  # the example


def part_inputs(net, x: torch.Tensor) -> tuple[list, list]:
    """(module, the tensor reaching it inside the network) for every block, and for every other part (stem,
    stitches, head)."""
    blocks, others = [], [(net.stem, x)]
    with torch.no_grad():
        x = net.stem(x)
        for k, block in enumerate(net.blocks):
            if k:
                others.append((net.stitches[k - 1], x))
                x = net.stitches[k - 1](x)
            blocks.append((block, x))
            x = block(x)
    others.append((net.head, x))
    return blocks, others


def part_macs(net, parts) -> int:
    from reassembly.measure import mac_counter

    with torch.no_grad(), mac_counter() as counter:
        for module, tensor in parts:
            module(tensor[:1])
    return counter.get_total_flops() // 2


def once(fn) -> tuple[float, float]:
    """Wall-clock and CPU time (all of this process's threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def latency(net, batch: int, pairs: int) -> dict:
    """Time the network and its blocks alone in alternation, one forward pass each per pair: on a shared machine
    the speed of identical work drifts, and adjacent passes see the same drift. CPU time is reported beside
    wall-clock time because other processes on a shared machine inflate the latter only. The stem, stitches and
    head are timed alone too, to separate the work they add from what composing the parts costs."""
    net.eval()
    x = torch.randn(batch, *net.structure.input_size)
    blocks, others = part_inputs(net, x)
    whole, alone, extra = [], [], []

    def run_alone(parts):
        times = [once(lambda m=m, t=t: m(t)) for m, t in parts]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    with torch.no_grad():
        for _ in range(3):  # warm-up
            net(x)
            run_alone(blocks + others)
        for _ in range(pairs):
            whole.append(once(lambda: net(x)))
            alone.append(run_alone(blocks))
            extra.append(run_alone(others))
    result = {}
    for kind, i in (("wall-clock", 0), ("CPU", 1)):
        w, b = [t[i] for t in whole], [t[i] for t in alone]
        bo = [t[i] + e[i] for t, e in zip(alone, extra)]
        result[kind] = {"median": statistics.median(a / c for a, c in zip(w, b)), "fastest": min(w) / min(b),
                        "all parts": statistics.median(a / c for a, c in zip(w, bo))}
        print(f"  {kind:>10}: network median {1e3 * statistics.median(w):7.2f} ms, blocks alone "
              f"{1e3 * statistics.median(b):7.2f} ms: ratio median {result[kind]['median']:.3f}, fastest/fastest "
              f"{result[kind]['fastest']:.3f}; network / (blocks + stem, stitches and head alone) "
              f"{result[kind]['all parts']:.3f}")
    block_macs, other_macs = part_macs(net, blocks), part_macs(net, others)
    print(f"  the stem, stitches and head hold {other_macs:,} of the network's {block_macs + other_macs:,} MACs "
          f"({100 * other_macs / block_macs:.1f}% on top of the blocks')")
    return result


def accuracy_before_training(spec: str, data: str, probe_size: int, seed: int) -> dict:
    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    probe = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:probe_size])
    blocks = [pretrained_block(*s) for s in parse_blocks(spec)]
    arms = {"least-squares": ("stem", "stitches", "head"), "default + ridge head": ("head",), "default": ()}
    scores = {}
    for arm, parts in arms.items():
        torch.manual_seed(seed)
        net = build_network(blocks, train.num_classes, classes=list(train.classes))
        started = time.perf_counter()
        if parts:
            least_squares_init(net, blocks, probe.images, probe.labels, parts=parts, progress=False)
        fitted = time.perf_counter() - started
        scores[arm] = evaluate(net, test, net.structure.mean, net.structure.std, progress=False).top1
        print(f"  {arm:<22} top-1 {scores[arm]:5.2f} % on {len(test)} test images of {test.name} "
              f"(fit {fitted:.1f} s)")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", default=[OWN_STEM, THREE], help="networks to measure, one spec each")
    parser.add_argument("--data", default="cifar10[5:10]")
    parser.add_argument("--probe-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=50, help="alternating network / blocks timings")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.blocks:
        blocks = [pretrained_block(*s) for s in parse_blocks(spec)]
        net = build_network(blocks, 5)
        print(f"network {spec}: {count_params(net):,} parameters, "
              f"{count_macs(net, net.structure.input_size):,} MACs; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(f"latency at batch {args.batch}, {args.pairs} alternating passes:")
        latency(net, args.batch, args.pairs)
        print("target: network / blocks alone <= 1.1")
        print(f"top-1 before any training ({args.probe_size} probe images, seed {args.seed}):")
        accuracy_before_training(spec, args.data, args.probe_size, args.seed)


if __name__ == "__main__":
    main()
