"""Which least-squares initialisation fine-tunes best: the head (fitted or zeroed) and batch-norm recalibration,
measured on the Split-CIFAR validation split.

Each network (DeRy's choices of both Split-CIFAR tables, and the best zoo model of each budget as a candidate with
its own stem) is stitched once per variant, its least-squares probe drawn only from the 800-per-class *fit* part
of the target training images (``split_cifar.target_splits``: the 200 validation images per class are never
seen), then fully fine-tuned on that part with the stitching recipe and scored on the validation part. Each run
records its epoch-1 training loss and its final validation top-1. The test images choose nothing.

    python benchmarks/init_study.py --out runs/init-study --jobs 2 --report results/init-study

Runs are resumable ``train_classifier`` directories; re-running skips finished ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from common import Job, add_run_options, run_processes, stitched_on, write_report
from split_cifar import recipe, target_splits, this_machine

from reassembly.io import write_text

NETS = {
    "dery-0.5M": "mobilenext_cifar5:1-3,mobilenetv2_cifar5:3-7,vit_cifar5:4-5,vit_cifar5:5-7",
    "dery-1.5M": "mobilenext_cifar5:1-3,mobilenetv2_cifar5:3-7,mobilenetv2_cifar5:7-13,mobilenetv2_cifar5:13-19",
    "zoo-resnet20": "resnet20_cifar5:0-4,resnet20_cifar5:4-6,resnet20_cifar5:6-9,resnet20_cifar5:9-10",
    "zoo-mobilenext": "mobilenext_cifar5:0-3,mobilenext_cifar5:3-9,mobilenext_cifar5:9-15,mobilenext_cifar5:15-21",
}
VARIANTS = {  # name: (head, recalibrate_norms)
    "fit+recal": ("fit", True),
    "zero+recal": ("zero", True),
    "fit": ("fit", False),
}


def jobs(args) -> list[dict]:
    return [{"name": f"{net}-{variant}-lr{lr:g}", "net": net, "variant": variant, "lr": lr}
            for net, variant, lr in itertools.product(args.nets, args.variants, args.lrs)]


def run_job(job: dict, out: Path, args) -> None:
    from reassembly.train import train_classifier

    torch.set_num_threads(args.threads)
    splits = target_splits(args.per_class)
    head, recalibrate = VARIANTS[job["variant"]]
    net, report = stitched_on(NETS[job["net"]], splits["fit"], head=head, recalibrate_norms=recalibrate)
    run_dir = out / job["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "device.json", json.dumps(this_machine()) + "\n")
    write_text(run_dir / "init.json", json.dumps(report, indent=1) + "\n")
    train_classifier(net, splits["fit"], splits["val"], recipe(args.epochs, job["lr"]), run_dir, seed=0,
                     progress=False, metadata={"job": job, "blocks": NETS[job["net"]]})


def finished(out: Path, job: dict, epochs: int) -> dict | None:
    path = out / job["name"] / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["epochs"] == epochs else None


def epoch_one_loss(out: Path, job: dict) -> float | None:
    path = out / job["name"] / "log.jsonl"
    if not path.is_file():
        return None
    first = json.loads(path.read_text().splitlines()[0])
    return first.get("train_loss")


def report(args) -> dict:
    rows = []
    for job in jobs(args):
        summary = finished(args.out, job, args.epochs)
        init_path = args.out / job["name"] / "init.json"
        head = next((f for f in json.loads(init_path.read_text())["fits"] if f["layer"] == "head"), {}) \
            if init_path.is_file() else {}
        rows.append({**job, "val_top1": summary["final"]["test_top1"] if summary else None,
                     "epoch1_loss": epoch_one_loss(args.out, job),
                     "head_held_out_top1": head.get("held_out_top1"), "head_ridge": head.get("ridge")})
    record = {"command": " ".join(["python", "benchmarks/init_study.py", *sys.argv[1:]]), **this_machine(),
              "epochs": args.epochs, "per_class": args.per_class, "nets": {n: NETS[n] for n in args.nets},
              "rows": rows}
    lines = ["# Least-squares initialisation variants, fully fine-tuned (validation split)", "",
             f"Command: `{record['command']}`", "",
             (f"Machine: {record['device']}, torch {record['torch']}. Target cifar10[5:10]; probe (1,000 images) "
              f"and training from the {args.per_class * 4 // 5} per class of the fit split, scored on the "
              f"{args.per_class // 5} per class held out; {args.epochs} epochs, seed 0."), "",
             "| network | init | lr | epoch-1 train loss | val top-1 % | head's held-out top-1 before training |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        def fmt(value, spec):
            return "unfinished" if value is None else format(value, spec)
        lines.append(f"| {row['net']} | {row['variant']} | {row['lr']:g} | {fmt(row['epoch1_loss'], '.3f')} | "
                     f"{fmt(row['val_top1'], '.2f')} | {fmt(row['head_held_out_top1'], '.1f')} |")
    write_report(args.report, record, "\n".join(lines) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/init-study"))
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class (smoke runs)")
    add_run_options(parser)
    args = parser.parse_args()
    if args.only:
        run_job(json.loads(args.only), args.out, args)
        return
    if not args.report_only:
        target_splits(args.per_class)  # decode once before the workers start
        common = ["--out", str(args.out), "--threads", str(args.threads), "--epochs", str(args.epochs),
                  "--per-class", str(args.per_class)]
        todo = [Job(job["name"], [sys.executable, __file__, *common, "--only", json.dumps(job)],
                    args.out / "logs" / f"{job['name']}.log")
                for job in jobs(args) if finished(args.out, job, args.epochs) is None]
        failed = run_processes(todo, args.jobs)
        if failed:
            print(f"failed runs: {', '.join(failed)}; see {args.out}/logs", flush=True)
    report(args)


if __name__ == "__main__":
    main()
