"""The similarity stage's cost over the bare forward passes it needs, and its peak memory as the probe set grows.

Time: in one process, alternately, (a) the bare forward passes of every zoo model over the probe set, in the
stage's batches, and (b) ``compute_similarity`` over the same probe set (dissection, taps, CKA accumulation, the
final matrices and their files; heatmaps off, they are drawing). After one warm-up of each, every round runs (b)
between two runs of (a) and prints (b) over their mean: on a shared machine the speed of identical work drifts by
up to 2x over minutes, and the bracket cancels a drift that is steady over the round. The summary gives the median
of the rounds and the fastest (b) over the fastest (a). The target is at most 1.3.

Memory: two child processes run the stage on N and on 2N probe images and report their peak resident memory
(``ru_maxrss``) and how far it rose during the stage; streaming keeps both flat in N.

    python benchmarks/bench_similarity.py [--zoo split-cifar] [--probe-size 2000] [--rounds 3] [--threads 2]

The probe images are drawn (seed 0) from CIFAR-10 classes 0-4, train split, as the Split-CIFAR protocol does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from reassembly.data import load_dataset, normalize
from reassembly.similarity import compute_similarity, load_zoo
from reassembly.similarity.stage import batch_bounds


def probe_set(size: int, seed: int = 0):
    data = load_dataset("cifar10[0:5]", "train")
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size])


def bare_forwards(zoo, probe, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for first, stop in batch_bounds(len(probe), batch_size):
            images = probe.images[first:stop]
            for member in zoo:
                member.model(normalize(images, member.mean, member.std))
    return time.perf_counter() - start


def similarity_stage(zoo, probe, batch_size: int, estimator: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        compute_similarity(zoo, probe, out, batch_size=batch_size, estimator=estimator, heatmaps=False,
                           progress=False)
        return time.perf_counter() - start


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """Run the stage once on ``--probe-size`` images and print peak memory as JSON (the memory measurement)."""
    zoo, probe = load_zoo(args.zoo), probe_set(args.probe_size)
    similarity_stage(zoo, probe_set(8), args.batch_size, args.estimator)  # imports and first-call set-up
    before = max_rss_mib()
    similarity_stage(zoo, probe, args.batch_size, args.estimator)
    print(json.dumps({"probe": len(probe), "peak_mib": max_rss_mib(), "rise_mib": max_rss_mib() - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="split-cifar")
    parser.add_argument("--probe-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--estimator", choices=["minibatch", "exact"], default="minibatch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the two memory child processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    zoo, probe = load_zoo(args.zoo), probe_set(args.probe_size)
    print(f"zoo {args.zoo}: {', '.join(m.name for m in zoo)}; {len(probe)} probe images, batch {args.batch_size}, "
          f"estimator {args.estimator}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    similarity_stage(zoo, probe_set(8), args.batch_size, args.estimator)  # warm-up: imports, kernels, dissection
    bare_forwards(zoo, probe_set(8), args.batch_size)
    bares, stages, ratios = [bare_forwards(zoo, probe, args.batch_size)], [], []
    for round_ in range(args.rounds):
        stages.append(similarity_stage(zoo, probe, args.batch_size, args.estimator))
        bares.append(bare_forwards(zoo, probe, args.batch_size))
        bracket = (bares[-2] + bares[-1]) / 2
        ratios.append(stages[-1] / bracket)
        print(f"  round {round_ + 1}: bare forwards {bares[-2]:6.2f} s, similarity stage {stages[-1]:6.2f} s, "
              f"bare forwards {bares[-1]:6.2f} s: ratio {ratios[-1]:.3f}")
    print(f"similarity stage / bare forwards: median of rounds {statistics.median(ratios):.3f}, "
          f"fastest / fastest {min(stages) / min(bares):.3f} (target <= 1.3)")
    if args.no_memory:
        return
    peaks = []
    for size in (args.probe_size, 2 * args.probe_size):
        command = [sys.executable, __file__, "--child", "--zoo", args.zoo, "--probe-size", str(size),
                   "--batch-size", str(args.batch_size), "--estimator", args.estimator]
        if args.threads:
            command += ["--threads", str(args.threads)]
        peaks.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
        print(f"  probe {size:6d}: peak RSS {peaks[-1]['peak_mib']:8.1f} MiB, rise during the stage "
              f"{peaks[-1]['rise_mib']:7.1f} MiB")
    print(f"peak memory at 2N / at N: {peaks[1]['peak_mib'] / peaks[0]['peak_mib']:.3f} (flat is 1.0)")


if __name__ == "__main__":
    main()
