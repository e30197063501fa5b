"""Rerun every benchmark protocol behind `results/`, one after another, with the commands that produced the committed
files (issue 14). Every step resumes: the training-heavy ones skip finished runs, the rest are quick to redo.

    python benchmarks/run_all.py --list                 # the plan: each step, its command, its cost, what it writes
    python benchmarks/run_all.py                        # everything (days on a 2-core CPU; see the costs)
    python benchmarks/run_all.py --only stitch lego     # some steps
    python benchmarks/run_all.py --skip-heavy           # only the steps that take minutes, not hours

`make bench` runs `--skip-heavy`. Each step's output goes to runs/bench-logs/STEP.log; a text benchmark's output is
also appended to its results file under a header giving the date, machine and commit, so earlier runs stay in place
for comparison. Steps marked heavy were run on a GPU lent to the project where their results say so: on a CPU they
are correct but slow (use --jobs on a machine with more cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = [sys.executable]
CLI = [sys.executable, "-m", "reassembly"]


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    commands: list[list[str]]
    cost: str  # wall-clock on this project's 2-core CPU unless it says otherwise
    append_to: str | None = None  # a text benchmark: its output is appended here
    heavy: bool = False


STEPS = [
    Step("similarity", "CKA and the K=4 partition of the Split-CIFAR zoo (results/split-cifar)",
         [CLI + ["similarity", "--zoo", "split-cifar", "--data", "cifar10[0:5]", "--probe-size", "2000", "--seed", "0",
                 "--out", "results/split-cifar"],
          CLI + ["partition", "results/split-cifar", "--k", "4", "--eps", "0.2", "--seed", "0"]], "5 min"),
    Step("bench-similarity", "similarity's cost against bare forward passes",
         [PY + ["benchmarks/bench_similarity.py", "--threads", "2", "--rounds", "5"]], "10 min",
         append_to="results/split-cifar/bench_similarity.txt"),
    Step("search", "the search on the shipped partition (results/search)",
         [CLI + ["search", "results/split-cifar", "--data", "cifar10[5:10]", "--params", "0.5M", "--macs", "60M",
                 "--proxy", "naswot", "--top-k", "20", "--seed", "0", "--threads", "1", "--out",
                 "results/search/split-cifar-naswot-0.5M-60M.json"],
          CLI + ["search", "results/split-cifar", "--data", "cifar10[5:10]", "--params", "0.5M", "--macs", "60M",
                 "--proxy", "naswot", "--top-k", "100", "--seed", "0", "--threads", "1", "--out",
                 "results/search/split-cifar-naswot-0.5M-60M-all.json"]], "2 min"),
    Step("bench-search", "the program's solve and top-k time, and exactness against brute force",
         [PY + ["benchmarks/bench_search.py", "--seeds", "3", "--threads", "1"]], "10 min",
         append_to="results/search/bench_search.txt"),
    Step("stitch", "reassembled-network latency against its blocks; accuracy before training by initialisation",
         [PY + ["benchmarks/bench_stitch.py", "--threads", "1", "--pairs", "50"],
          PY + ["benchmarks/bench_stitch.py", "--threads", "2", "--pairs", "50"]], "15 min",
         append_to="results/stitch/bench_stitch.txt"),
    Step("split-cifar-table", "the Split-CIFAR table (0.5M / 60M budget, 3 seeds, with the random-partition row) and "
         "the proxy study",
         [CLI + ["partition", "results/split-cifar", "--k", "4", "--eps", "0.2", "--random", "--seed", "0", "--out",
                 "results/split-cifar-table/random-partition/partition.json"],
          CLI + ["search", "results/split-cifar-table/random-partition", "--data", "cifar10[5:10]", "--params", "0.5M",
                 "--macs", "60M", "--proxy", "naswot", "--top-k", "100", "--seed", "0", "--threads", "1", "--out",
                 "results/split-cifar-table/random-partition/search.json"],
          PY + ["benchmarks/split_cifar.py", "--out", "runs/split-cifar-table", "--epochs", "10", "--seeds", "3",
                "--proxy-nets", "24", "--proxy-epochs", "3", "--lrs", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2",
                "--random-partition", "results/split-cifar-table/random-partition/search.json",
                "--proxy-scores", "results/split-cifar-table/proxy-scores", "--jobs", "2", "--threads", "1",
                "--report", "results/split-cifar-table"]],
         "about 4 min on an H100 at 14 jobs; roughly a day on the 2-core CPU", heavy=True),
    Step("split-cifar-table-1.5M", "the Split-CIFAR table at the second budget (1.5M / 100M, 3 seeds, with the "
         "random-partition row and the recalibrated-norms row, no proxy study; results/split-cifar-table-1.5M)",
         [CLI + ["search", "results/split-cifar", "--data", "cifar10[5:10]", "--params", "1.5M", "--macs", "100M",
                 "--proxy", "naswot", "--top-k", "600", "--seed", "0", "--threads", "1", "--out",
                 "results/search/split-cifar-naswot-1.5M-100M-all.json"],
          CLI + ["search", "results/split-cifar-table/random-partition", "--data", "cifar10[5:10]", "--params", "1.5M",
                 "--macs", "100M", "--proxy", "naswot", "--top-k", "600", "--seed", "0", "--threads", "1", "--out",
                 "results/split-cifar-table-1.5M/random-partition-search.json"],
          PY + ["benchmarks/split_cifar.py", "--search", "results/search/split-cifar-naswot-1.5M-100M-all.json",
                "--random-partition", "results/split-cifar-table-1.5M/random-partition-search.json",
                "--out", "runs/split-table-1.5M", "--epochs", "10", "--seeds", "3", "--proxy-nets", "0",
                "--lrs", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "--recalibrated", "--jobs", "2", "--threads", "1",
                "--report", "results/split-cifar-table-1.5M"]],
         "minutes on an H100 at 14 jobs; about 10 hours of one core of the 2-core CPU", heavy=True),
    Step("stitch-mode-gap", "train mode against eval mode of the 1.5M table's least-squares-initialised networks "
         "before training, batch-norm recalibration afterwards, and the network stitched with --recalibrate-norms "
         "(needs the nets of split-cifar-table-1.5M)",
         [PY + ["benchmarks/stitch_mode_gap.py", "runs/split-table-1.5M/nets/dery", "runs/split-table-1.5M/nets/random",
                "runs/split-table-1.5M/nets/random-partition", "--recalibrate"],
          PY + ["benchmarks/stitch_mode_gap.py", "runs/split-table-1.5M/nets/dery-recalibrated"]], "10 min",
         append_to="results/split-cifar-table-1.5M/stitch_mode_gap.txt", heavy=True),
    Step("sandglass", "MobileNeXt-32 against MobileNetV2-32 at equal cost, 5 paired seeds (results/sandglass)",
         [PY + ["benchmarks/bench_sandglass.py", "--data", "cifar10", "--seeds", "5", "--epochs", "15",
                "--batch-size", "512", "--lr", "0.2", "--eval-every", "5", "--out", "runs/sandglass", "--jobs", "2",
                "--threads", "1", "--report", "results/sandglass"]],
         "about 15 min on an H100 at 10 jobs; days on the 2-core CPU", heavy=True),
    Step("nas", "DARTS searches with and without sandglass operations, each cell trained (results/nas)",
         [CLI + ["nas", "search", "--space", "darts", "--data", "cifar10", "--out", "runs/nas/darts"],
          CLI + ["nas", "search", "--space", "extend", "--data", "cifar10", "--out", "runs/nas/extend"],
          CLI + ["nas", "train", "runs/nas/darts/genotype.json", "--data", "cifar10", "--out", "runs/nas/darts-train",
                 "--threads", "1"],
          CLI + ["nas", "train", "runs/nas/extend/genotype.json", "--data", "cifar10", "--out",
                 "runs/nas/extend-train", "--threads", "1"],
          CLI + ["nas", "train", "DARTS_V2", "--data", "cifar10", "--out", "runs/nas/DARTS_V2-train", "--threads", "2"],
          PY + ["benchmarks/nas_table.py", "--runs", "runs/nas", "--out", "results/nas"]],
         "about 1 h of search and 1.5-2.5 h of training per space on the 2-core CPU, 30 min for the reference cell",
         heavy=True),
    Step("lego-bench", "relative-contribution time against one forward+backward pass (results/lego/bench)",
         [PY + ["benchmarks/bench_lego.py", "--samples", "300", "--rounds", "5", "--threads", "1", "--out",
                "results/lego/bench"]], "5 min"),
    Step("lego-components", "MDA components for classes {0,1,2} of three CNNs (results/lego/components)",
         [PY + ["benchmarks/lego_components.py", "--threads", "2", "--out", "results/lego/components"]],
         "about 1 h (calibration on 14,100 held-out images, and the layer restoration where the grid falls short)"),
    Step("lego-components-loss-matched",
         "the same, calibrated with the held-out cross-entropy too (results/lego/components-loss-matched)",
         [PY + ["benchmarks/lego_components.py", "--threads", "2", "--match-loss", "--out",
                "results/lego/components-loss-matched"]], "80 min"),
    Step("lego-assembly", "MDA components of two models assembled, with and without scaling (results/lego/assembly)",
         [PY + ["benchmarks/lego_assembly.py", "--work", "runs/lego", "--out", "results/lego/assembly"]],
         "tens of minutes (four calibrated disassemblies, five assemblies)"),
    Step("third-party", "the third-party CIFAR ResNets on the JPEG copy of CIFAR-10 (results/third-party)",
         [PY + ["benchmarks/third_party_eval.py", "--out", "results/third-party"]], "10 min"),
    Step("dissect", "dissection time of a 56-node ResNet-110",
         [PY + ["benchmarks/bench_dissect.py", "--threads", "1"]], "1 min", append_to="results/graph/bench_dissect.txt"),
]


def plan_lines(steps: list[Step]) -> list[str]:
    lines = []
    for step in steps:
        lines.append(f"{step.name}{' (heavy)' if step.heavy else ''}: {step.what}; {step.cost}")
        lines += ["    " + " ".join(_shown(c)) for c in step.commands]
    return lines


def _shown(command: list[str]) -> list[str]:
    """A command as a person would type it (python / reassembly instead of the interpreter's path)."""
    head = ["reassembly"] if command[1:3] == ["-m", "reassembly"] else ["python"]
    rest = command[3:] if head == ["reassembly"] else command[1:]
    return head + [f"'{a}'" if "[" in a else a for a in rest]


def header(step: Step, command: list[str]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    return (f"\n# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit.stdout.strip() or '?'}, "
            f"{platform.machine()} CPU with {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} (benchmarks/run_all.py step {step.name})\n$ {' '.join(_shown(command))}\n")


def run_step(step: Step, logs: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{step.name}.log", "a") as log:
        for command in step.commands:
            print(f"[{step.name}] {' '.join(_shown(command))}", flush=True)
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                    check=False)
            log.write(result.stdout)
            if result.returncode:
                print(f"[{step.name}] failed (exit {result.returncode}); see {logs / (step.name + '.log')}")
                return False
            if step.append_to:
                with open(ROOT / step.append_to, "a") as out:
                    out.write(header(step, command) + result.stdout)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    parser.add_argument("--skip-heavy", action="store_true", help="leave out the steps that take hours")
    parser.add_argument("--logs", type=Path, default=ROOT / "runs" / "bench-logs")
    args = parser.parse_args()
    steps = [s for s in STEPS if (not args.only or s.name in args.only) and not (args.skip_heavy and s.heavy)]
    if args.list:
        print("\n".join(plan_lines(steps)))
        return
    failed = [step.name for step in steps if not run_step(step, args.logs)]
    print(f"{len(steps) - len(failed)} of {len(steps)} steps done" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
