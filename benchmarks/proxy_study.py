"""Which training-free proxy predicts how well an assembled network fine-tunes: Kendall's tau on the validation split.

For one Split-CIFAR budget:

1. One search (``reassembly.search.search_stage``) over the CKA partition of ``results/split-cifar`` scores every
   feasible network (zoo models with their own stems included) with the transfer proxies (``fit``, ``fit_loss``,
   ``logme``, ``knn``) and NASWOT (as this library hooks it and as the official code does), on images of the
   *fit* split only (800 of the 1,000 training images per class; ``split_cifar.target_splits``).
2. ``--nets`` of those networks are drawn uniformly (``--sample-seed``), each stitched with the library's default
   least-squares initialisation (probe from the fit split), fully fine-tuned as ``reassembly train --mode full``
   does (head started as its default) for ``--epochs`` epochs with the stitching recipe at ``--lr`` on the fit
   split, and scored on the 200 validation images per class.
3. Kendall's tau and its p-value of every proxy, the parameter count and the MACs against that accuracy.

The test images are never read: the default proxy is chosen from this study.

    python benchmarks/proxy_study.py --params 0.5M --macs 60M --out runs/proxy-study-0.5M --jobs 2 \\
        --report results/proxy-study/0.5M

Runs are resumable ``train_classifier`` directories; re-running skips finished ones (and the search, once written).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from common import Job, add_run_options, run_processes, stitched_on, write_report
from split_cifar import recipe, target_splits, this_machine

from reassembly.io import write_text

PARTITION = Path(__file__).resolve().parent.parent / "results" / "split-cifar" / "partition.json"
PROXIES = ("fit", "fit_loss", "logme", "knn", "naswot", "naswot_official")


def search(args) -> dict:
    """The search over every feasible network, scored by every proxy (once; then read back)."""
    from reassembly.search import Budget
    from reassembly.search.stage import search_stage

    path = args.out / "search.json"
    if not path.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(args.threads)
        search_stage(PARTITION, target_splits(args.per_class)["fit"], Budget.parse(args.params, args.macs),
                     proxy=PROXIES[0], also=PROXIES[1:], max_scored=100_000, seed=0, batches=16, batch_size=32,
                     out=path, progress=True)
    return json.loads(path.read_text())


def sample(record: dict, args) -> list[dict]:
    feasible = [c for c in record["candidates"] if c["within_budget"]]
    return random.Random(args.sample_seed).sample(feasible, min(args.nets, len(feasible)))


def jobs(record: dict, args) -> list[dict]:
    return [{"name": f"net{i:02d}", "blocks": ",".join(c["blocks"]), "lr": args.lr}
            for i, c in enumerate(sample(record, args))]


def run_job(job: dict, args) -> None:
    from reassembly.stitch.training import DEFAULT_HEAD_START, start_head
    from reassembly.train import train_classifier

    torch.set_num_threads(args.threads)
    splits = target_splits(args.per_class)
    net, report = stitched_on(job["blocks"], splits["fit"])
    start_head(net, DEFAULT_HEAD_START["full"])  # as `reassembly train --mode full` starts
    run_dir = args.out / "runs" / job["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "device.json", json.dumps(this_machine()) + "\n")
    write_text(run_dir / "init.json", json.dumps(report, indent=1) + "\n")
    train_classifier(net, splits["fit"], splits["val"], recipe(args.epochs, job["lr"]), run_dir, seed=0,
                     progress=False, metadata={"job": job})


def finished(job: dict, args) -> dict | None:
    path = args.out / "runs" / job["name"] / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["epochs"] == args.epochs else None


def report(record: dict, args) -> dict:
    from scipy import stats

    accuracy = {}
    for job in jobs(record, args):
        summary = finished(job, args)
        if summary is not None:
            accuracy[job["blocks"]] = summary["final"]["test_top1"]  # the eval split of these runs is val
    candidates = {",".join(c["blocks"]): c for c in record["candidates"]}
    signs = {record["proxy"]["name"]: record["proxy"]["better"], **{a["name"]: a["better"] for a in record["also"]}}
    columns = {name: {b: (c["scores"][name] if "scores" in c else c["proxy"]) for b, c in candidates.items()}
               for name in signs}
    columns["params"] = {b: c["params"] for b, c in candidates.items()}
    columns["macs"] = {b: c["macs"] for b, c in candidates.items()}
    taus = {}
    for name, table in columns.items():
        sign = -1 if signs.get(name) == "lower" else 1
        pairs = [(sign * table[b], accuracy[b]) for b in sorted(accuracy) if table.get(b) is not None]
        if len(pairs) >= 3:
            tau = stats.kendalltau(*zip(*pairs))
            taus[name] = {"tau": float(tau.statistic), "p": float(tau.pvalue), "n": len(pairs)}
    zoo = [{"name": z["name"], "rank": z["rank"], "of": record["scored"]} for z in record["zoo_models"] if z["rank"]]
    result = {"command": " ".join(["python", "benchmarks/proxy_study.py", *sys.argv[1:]]), **this_machine(),
              "budget": record["budget_text"], "feasible": record["scored"], "epochs": args.epochs, "lr": args.lr,
              "sample_seed": args.sample_seed, "nets": len(jobs(record, args)), "finished": len(accuracy),
              "accuracy": accuracy, "tau": taus, "zoo_ranks_by_fit": zoo,
              "search_seconds": record["seconds"]}
    lines = [f"# Proxy study, Split-CIFAR at {record['budget_text']}", "", f"Command: `{result['command']}`", "",
             (f"Machine: {result['device']}, torch {result['torch']}. {result['finished']} of {result['nets']} networks "
              f"drawn uniformly (seed {args.sample_seed}) from the {record['scored']} within the budget, each "
              f"least-squares initialised and fully fine-tuned {args.epochs} epochs at lr {args.lr:g} on the fit split "
              f"({args.per_class * 4 // 5} images per class of cifar10[5:10]), scored on the validation split "
              f"({args.per_class // 5} per class). Proxies "
              "scored on fit-split images only (higher oriented as better)."), "",
             "| score | Kendall tau | p | networks |", "|---|---:|---:|---:|"]
    for name, t in sorted(taus.items(), key=lambda item: -item[1]["tau"]):
        lines.append(f"| {name} | {t['tau']:+.3f} | {t['p']:.3g} | {t['n']} |")
    if accuracy:
        values = sorted(accuracy.values())
        lines += ["", (f"Validation top-1 of the fine-tuned networks: {values[0]:.1f} to {values[-1]:.1f} % "
                       f"(median {values[len(values) // 2]:.1f}).")]
    write_report(args.report, result, "\n".join(lines) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--macs", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nets", type=int, default=40)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class (smoke runs)")
    add_run_options(parser)
    args = parser.parse_args()
    if args.only:
        run_job(json.loads(args.only), args)
        return
    record = search(args)
    if not args.report_only:
        common = ["--params", args.params, "--macs", args.macs, "--out", str(args.out), "--threads",
                  str(args.threads), "--epochs", str(args.epochs), "--lr", str(args.lr), "--per-class",
                  str(args.per_class), "--nets", str(args.nets), "--sample-seed", str(args.sample_seed)]
        todo = [Job(job["name"], [sys.executable, __file__, *common, "--only", json.dumps(job)],
                    args.out / "logs" / f"{job['name']}.log")
                for job in jobs(record, args) if finished(job, args) is None]
        failed = run_processes(todo, args.jobs)
        if failed:
            print(f"failed runs: {', '.join(failed)}; see {args.out}/logs", flush=True)
    report(record, args)


if __name__ == "__main__":
    main()
