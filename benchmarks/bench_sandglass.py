"""MobileNeXt-32 against MobileNetV2-32 at equal cost: one recipe, paired seeds, final-epoch accuracy.

Both arms are the zoo's 32x32 layouts at width 0.75 (``cifar_mobilenext_075``, ``cifar_mobilenetv2_075``), checked
to be within 5% of each other in parameters and MACs before anything trains. Every (arm, seed) pair is one resumable
run of ``reassembly.train.train_classifier`` under the zoo's SGD recipe (lr 0.1, batch 128, nesterov, wd 5e-4,
1 warm-up epoch, cosine, crop+flip) with ``--epochs`` epochs. Seed ``s`` fixes the initial weights of both arms, and
both arms of a seed see the same data order and augmentation draws, so the difference per seed is a paired sample.

The report (``--report DIR``: report.md + results.json) gives per-seed final-epoch test top-1, mean and spread per arm,
the paired differences with a paired t-test and a Wilcoxon signed-rank test, and two speed readings: training-step
time of each arm alone on the device (alternating arms, median of rounds), and the per-epoch wall time of the runs
themselves (those ran ``--jobs`` at a time, so their ratio is what a shared device gives).

    python benchmarks/bench_sandglass.py --data cifar10 --seeds 5 --epochs 10 --out runs/sandglass \
        --jobs 10 --report results/sandglass

Re-running the same command resumes unfinished runs and rewrites the report; ``--report-only`` only aggregates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import Job, run_processes, write_report
import torch.nn.functional as F

ARMS = {"mobilenext": "cifar_mobilenext_075", "mobilenetv2": "cifar_mobilenetv2_075"}
MATCH_TOLERANCE = 0.05


def recipe(args):
    """The zoo's SGD recipe with this run's epochs, and a batch size and peak rate if given (the same for both arms)."""
    from reassembly.zoo.recipes import SGD_CIFAR

    update = {"epochs": args.epochs, "eval_every": min(args.eval_every, args.epochs)}
    update.update({key: value for key, value in (("batch_size", args.batch_size), ("lr", args.lr)) if value is not None})
    return SGD_CIFAR.model_copy(update=update)


def build(arm: str, num_classes: int, seed: int) -> torch.nn.Module:
    from reassembly import create_model

    torch.manual_seed(seed)
    return create_model(ARMS[arm], num_classes=num_classes)


def costs(num_classes: int) -> dict:
    from reassembly.measure import count_macs, count_params

    table = {}
    for arm in ARMS:
        model = build(arm, num_classes, 0)
        table[arm] = {"architecture": ARMS[arm], "params": count_params(model),
                      "macs": count_macs(model.eval(), (3, 32, 32))}
    for key in ("params", "macs"):
        a, b = (table[arm][key] for arm in ARMS)
        if abs(a - b) > MATCH_TOLERANCE * max(a, b):
            raise SystemExit(f"the arms differ by more than {MATCH_TOLERANCE:.0%} in {key}: {a:,} vs {b:,}")
    return table


def step_times(num_classes: int, device: str, steps: int, rounds: int, batch: int) -> dict:
    """Median seconds per training step of each arm alone (channels_last, float32), arms alternating per round."""
    models, optimizers = {}, {}
    for arm in ARMS:
        models[arm] = build(arm, num_classes, 0).to(device, memory_format=torch.channels_last).train()
        optimizers[arm] = torch.optim.SGD(models[arm].parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (batch,), device=device)

    def run(arm: str, count: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(count):
            loss = F.cross_entropy(models[arm](x), y)
            optimizers[arm].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[arm].step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / count

    for arm in ARMS:
        run(arm, 5)  # warm-up: kernels chosen, caches filled
    readings = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm in ARMS:
            readings[arm].append(run(arm, steps))
    return {arm: statistics.median(values) for arm, values in readings.items()}


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-seed{seed}"


def train_one(arm: str, seed: int, args) -> None:
    from reassembly.data import load_dataset
    from reassembly.train import train_classifier

    torch.set_num_threads(args.threads)
    train_set = load_dataset(args.data, "train", max_per_class=args.max_per_class)
    test_set = load_dataset(args.data, "test")
    model = build(arm, train_set.num_classes, seed)
    train_classifier(model, train_set, test_set, recipe(args), run_dir(args.out, arm, seed),
                     seed=seed, progress=False, channels_last=True,
                     metadata={"benchmark": "sandglass", "arm": arm, "architecture": ARMS[arm]})


def launch(args, pending: list[tuple[str, int]]) -> None:
    """Run the pending (arm, seed) trainings, ``--jobs`` at a time, each in its own process with its own log."""
    jobs = [Job(f"{arm}:{seed}", [sys.executable, __file__, "--only", f"{arm}:{seed}", *forwarded(args)],
                run_dir(args.out, arm, seed) / "stdout.log") for arm, seed in pending]
    failed = run_processes(jobs, args.jobs)
    if failed:
        raise SystemExit(f"runs failed: {', '.join(failed)}; see their stdout.log under {args.out}")


def forwarded(args) -> list[str]:
    values = ["--data", args.data, "--epochs", str(args.epochs), "--out", str(args.out), "--threads", str(args.threads),
              "--eval-every", str(args.eval_every)]
    for option, value in (("--max-per-class", args.max_per_class), ("--batch-size", args.batch_size), ("--lr", args.lr)):
        if value is not None:
            values += [option, str(value)]
    return values


def finished(out: Path, arm: str, seed: int, epochs: int) -> dict | None:
    path = run_dir(out, arm, seed) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["epochs"] == epochs else None


def epoch_seconds(out: Path, arm: str, seed: int) -> float:
    log = [json.loads(line) for line in (run_dir(out, arm, seed) / "log.jsonl").read_text().splitlines()]
    return statistics.median(entry["seconds"] for entry in log)


def paired_statistics(first: list[float], second: list[float]) -> dict:
    from scipy import stats

    differences = [a - b for a, b in zip(first, second)]
    n = len(differences)
    mean = statistics.fmean(differences)
    spread = statistics.stdev(differences) if n > 1 else float("nan")
    result = {"n": n, "mean_difference": mean, "sd_difference": spread, "wins": sum(d > 0 for d in differences)}
    if n > 1 and spread > 0:
        half = stats.t.ppf(0.975, n - 1) * spread / n**0.5
        result.update(ci95=[mean - half, mean + half], t_test_p=float(stats.ttest_rel(first, second).pvalue),
                      wilcoxon_p=float(stats.wilcoxon(first, second).pvalue))
    return result


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def report(args, table: dict, alone: dict | None, machine: dict) -> dict:
    seeds = list(range(args.seeds))
    runs = {arm: [finished(args.out, arm, s, args.epochs) for s in seeds] for arm in ARMS}
    missing = [f"{arm}:{s}" for arm in ARMS for s, r in zip(seeds, runs[arm]) if r is None]
    if missing:
        raise SystemExit(f"unfinished runs: {', '.join(missing)}; run the command again without --report-only")
    top1 = {arm: [r["final"]["test_top1"] for r in runs[arm]] for arm in ARMS}
    per_epoch = {arm: [epoch_seconds(args.out, arm, s) for s in seeds] for arm in ARMS}
    record = {
        "command": " ".join(["python", "benchmarks/bench_sandglass.py", *sys.argv[1:]]),
        **machine, "data": args.data,
        "max_per_class": args.max_per_class, "epochs": args.epochs, "seeds": seeds, "jobs": args.jobs,
        "recipe": recipe(args).model_dump(), "costs": table,
        "final_top1": top1,
        "summary": {arm: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else float("nan"),
                          "min": min(v), "max": max(v)} for arm, v in top1.items()},
        "paired": paired_statistics(top1["mobilenext"], top1["mobilenetv2"]),
        "epoch_seconds_concurrent": {arm: statistics.median(v) for arm, v in per_epoch.items()},
        "step_seconds_alone": alone,
    }
    write_report(args.report, record, markdown(record))
    return record


def markdown(r: dict) -> str:
    arms = list(ARMS)
    lines = ["# MobileNeXt-32 vs MobileNetV2-32 at equal cost", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {r['device']}, torch {r['torch']}. Data: `{r['data']}`"
             + (f", {r['max_per_class']} training images per class" if r["max_per_class"] else ", all training images")
             + f", evaluated on the whole test split. {r['epochs']} epochs, seeds {r['seeds']}, "
             f"{r['jobs']} runs at a time on the device.", "",
             "| arm | architecture | params | MACs |", "|---|---|---:|---:|"]
    for arm in arms:
        c = r["costs"][arm]
        lines.append(f"| {arm} | `{c['architecture']}` | {c['params']:,} | {c['macs']:,} |")
    lines += ["", "Final-epoch test top-1 (%), one row per seed:", "",
              "| seed | " + " | ".join(arms) + " | difference |", "|---:|" + "---:|" * (len(arms) + 1)]
    for i, seed in enumerate(r["seeds"]):
        a, b = (r["final_top1"][arm][i] for arm in arms)
        lines.append(f"| {seed} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    s, p = r["summary"], r["paired"]
    lines.append("| mean ± sd | " + " | ".join(f"{s[arm]['mean']:.2f} ± {s[arm]['sd']:.2f}" for arm in arms)
                 + f" | {p['mean_difference']:+.2f} ± {p['sd_difference']:.2f} |")
    lines += ["", f"MobileNeXt minus MobileNetV2: {p['mean_difference']:+.2f} points on average, better on "
              f"{p['wins']} of {p['n']} seeds."]
    if "ci95" in p:
        lines.append(f"95% confidence interval of the mean difference {p['ci95'][0]:+.2f} to {p['ci95'][1]:+.2f}; "
                     f"paired t-test p = {p['t_test_p']:.3g}, Wilcoxon signed-rank p = {p['wilcoxon_p']:.3g} "
                     f"(with {p['n']} pairs the smallest two-sided Wilcoxon p is {2 / 2 ** p['n']:.3g}).")
    lines += ["", "| speed | " + " | ".join(arms) + " | ratio |", "|---|" + "---:|" * (len(arms) + 1)]
    if r["step_seconds_alone"]:
        t = r["step_seconds_alone"]
        lines.append(f"| training step alone, batch {r['recipe']['batch_size']} (ms) | " + " | ".join(f"{1e3 * t[a]:.1f}" for a in arms)
                     + f" | {t[arms[0]] / t[arms[1]]:.2f} |")
    e = r["epoch_seconds_concurrent"]
    lines.append(f"| epoch in the benchmark's runs, {r['jobs']} at a time (s) | "
                 + " | ".join(f"{e[a]:.1f}" for a in arms) + f" | {e[arms[0]] / e[arms[1]]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, each trained for both arms")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-per-class", type=int, default=None, help="train on a seeded sample (smoke runs)")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the zoo recipe's 128")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate; default: the zoo recipe's 0.1")
    parser.add_argument("--out", type=Path, default=Path("runs/sandglass"))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the step timing runs (training goes wherever accelerate puts it)")
    parser.add_argument("--time-steps", type=int, default=50, help="steps per timing round; 0 skips the timing")
    parser.add_argument("--time-rounds", type=int, default=5)
    parser.add_argument("--report", default=None, help="folder for report.md and results.json")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # ARM:SEED, used by the launcher
    args = parser.parse_args()
    if args.only:
        arm, seed = args.only.split(":")
        train_one(arm, int(seed), args)
        return
    from reassembly.data import load_dataset

    num_classes = load_dataset(args.data, "test").num_classes  # also fills the decoded-image cache once
    load_dataset(args.data, "train")
    table = costs(num_classes)
    print(json.dumps(table))
    alone_path, machine_path = args.out / "step_seconds_alone.json", args.out / "machine.json"
    if not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        machine_path.write_text(json.dumps({"device": device_name(args.device), "torch": torch.__version__}))
        if args.time_steps:
            torch.set_num_threads(args.threads)
            alone = step_times(num_classes, args.device, args.time_steps, args.time_rounds, recipe(args).batch_size)
            alone_path.write_text(json.dumps(alone))
            print("step seconds alone:", json.dumps(alone), flush=True)
        pending = [(arm, s) for s in range(args.seeds) for arm in ARMS if not finished(args.out, arm, s, args.epochs)]
        launch(args, pending)
    alone = json.loads(alone_path.read_text()) if alone_path.is_file() else None
    report(args, table, alone, json.loads(machine_path.read_text()))


if __name__ == "__main__":
    main()
