"""The Split-CIFAR table of DESIGN.md for one budget, and the proxy-quality study, from a search over every network.

Target: CIFAR-10 classes 5-9, 1,000 training images per class (the seed-0 draw every stage uses), all 5,000 target
test images. Rows, each trained by the same procedure:

* every shipped Split-CIFAR zoo model within the budget, fully fine-tuned. With a search that lists the zoo models
  as candidates (``zoo_models``, the library's search since own stems), a zoo model is stitched exactly as the
  reassembled networks are (its own stem and blocks, least-squares head, norms recalibrated; the head zeroed for
  full fine-tuning, as ``reassembly train --mode full`` starts); older searches give it a random new head;
* zoo NAME from scratch: the same architecture freshly initialised, trained the same way (DeRy's comparison with zoo
  architectures trained from scratch);
* DeRy frozen and DeRy full: the search's choice, stitched with least-squares initialisation, then trained with the
  blocks frozen (stem, stitches and head only) or entirely;
* DeRy from scratch: the same architecture cut from freshly initialised models, default-initialised stitches;
* random assembly: a network drawn uniformly (seeded) from the feasible networks within the budget other than the
  choice, stitched like DeRy's and fully fine-tuned;
* with ``--source-rows``, the paper's protocol rows: *DeRy on the source task* (DeRy's Table 7): the searched
  network stitched for the zoo's source task ``cifar10[0:5]``, blocks frozen, stem, stitches and head trained on all
  its 25,000 training images for ``--source-epochs`` (the zoo's 15) and scored on its test split next to each zoo
  model's own source accuracy (a report section, not a row); *DeRy + source training*: that source-trained network,
  its head zeroed, fine-tuned on the target like every other row;
* random partition + proxy (with ``--random-partition``): the same search run on one random partition
  (``reassembly partition --random``) instead of the CKA one; its choice is stitched and fully fine-tuned like DeRy's.
  This isolates what the similarity-driven partition adds.

The procedure: AdamW with the stitching recipe (``reassembly.stitch.training.RECIPE``: cosine, warm-up, label
smoothing 0.1) for ``--epochs`` epochs; the peak learning rate of each row is chosen from ``--lrs`` by final-epoch
accuracy on a validation split (200 images per class held out from the 1,000, seed 1), training on the other 800;
the chosen rate then trains on all 1,000 per class with ``--seeds`` seeds, and the table reports final-epoch test
top-1. The test images choose nothing. A network's least-squares probe is drawn from the images its run trains on
(the fit split for validation runs, all 1,000 per class for the seeded runs), so no validation image is fitted.

Proxy quality: ``--proxy-nets`` networks drawn uniformly (seeded) from the feasible ones are stitched, fully
fine-tuned for ``--proxy-epochs`` epochs at the recipe's rate and evaluated on the test split; Kendall's tau between
each proxy's score (from ``reassembly search --top-k`` files that scored every feasible network) and that accuracy
is reported next to the tau of parameter and MAC counts.

    python benchmarks/split_cifar.py --search results/search/split-cifar-naswot-0.5M-60M-all.json \
        --proxy-scores DIR_WITH_SEARCH_JSONS --out runs/split-cifar-table --jobs 12 --report results/split-cifar-table

Every training run is a resumable ``train_classifier`` directory; re-running the command skips finished runs, and
only the networks an unfinished run needs are stitched. Adding ``--random-partition`` to a finished table adds that
row to its plan and trains only it. Each run records the machine it ran on (``device.json``); the report names every
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
from pathlib import Path

import torch
from common import Job, add_run_options, run_processes, write_report

from reassembly.io import write_text

TARGET = "cifar10[5:10]"
SOURCE = "cifar10[0:5]"  # the Split-CIFAR zoo's source task
PER_CLASS = 1000  # DESIGN.md's protocol; --per-class changes it for smoke runs only


# ---------------------------------------------------------------- data

def target_splits(per_class: int = PER_CLASS) -> dict:
    """train (all 1,000 per class), fit (800) and val (200, a fifth) from the seed-0 draw, and the test split."""
    from reassembly.data import load_dataset

    train = load_dataset(TARGET, "train", max_per_class=per_class, seed=0)
    generator = torch.Generator().manual_seed(1)
    held = torch.zeros(len(train), dtype=torch.bool)
    for c in range(train.num_classes):
        members = torch.nonzero(train.labels == c).flatten()
        held[members[torch.randperm(len(members), generator=generator)[:per_class // 5]]] = True
    return {"train": train, "fit": train.subset(torch.nonzero(~held).flatten()),
            "val": train.subset(torch.nonzero(held).flatten()), "test": load_dataset(TARGET, "test")}


def source_splits() -> dict:
    """The zoo's source task: all its training images (5,000 per class) and its test split."""
    from reassembly.data import load_dataset

    return {"source-train": load_dataset(SOURCE, "train"), "source-test": load_dataset(SOURCE, "test")}


def split(name: str, per_class: int):
    return (source_splits() if name.startswith("source") else target_splits(per_class))[name]


# ---------------------------------------------------------------- the plan

def build_plan(args) -> dict:
    """Rows, networks to stitch and every training job, from the search file(s); written once to plan.json."""
    from reassembly.measure import count_macs, count_params
    from reassembly.zoo.pretrained import load_pretrained
    from reassembly.zoo.recipes import ZOO_SETS

    search = json.loads(Path(args.search).read_text())
    budget = search["budget"]
    limits = {key: budget[key]["max"] for key in ("params", "macs") if key in budget and budget[key].get("max")}
    feasible = [c for c in search["candidates"] if c["within_budget"]]
    choice = search["choice"]["blocks"]
    zoo_rows, zoo_nets = [], {}
    listed = {z["name"]: z for z in search.get("zoo_models", [])}
    for name in ZOO_SETS["split-cifar"]:
        if listed:  # the zoo model as a candidate network: stitched and trained like the reassembled ones
            zoo = listed.get(name)
            if not (zoo and zoo["within_budget"]):
                continue
            cost = {"params": zoo["params"], "macs": zoo["macs"]}
            zoo_nets[f"zoo-{name}"] = {"blocks": zoo["blocks"], "init": "least-squares"}
            zoo_nets[f"scratch-{name}"] = {"blocks": zoo["blocks"], "init": "default", "pretrained": False}
            zoo_rows += [{"row": f"zoo {name}", "kind": "net", "source": f"zoo-{name}", "mode": "full", **cost},
                         {"row": f"zoo {name} from scratch", "kind": "net", "source": f"scratch-{name}",
                          "mode": "full", **cost}]
            continue
        model = load_pretrained(name, num_classes=5).eval()
        cost = {"params": count_params(model), "macs": count_macs(model, (3, 32, 32))}
        if all(cost[k] <= v for k, v in limits.items()):
            zoo_rows.append({"row": f"zoo {name}", "kind": "zoo", "source": name, "mode": "full", **cost})
    rng = random.Random(args.sample_seed)
    others = [c for c in feasible if ",".join(c["blocks"]) != choice]
    random_net = rng.choice(others)
    sample = rng.sample(feasible, min(args.proxy_nets, len(feasible)))
    nets = {"dery": {"blocks": choice, "init": "least-squares"},
            "scratch": {"blocks": choice, "init": "default", "pretrained": False},
            "random": {"blocks": ",".join(random_net["blocks"]), "init": "least-squares"}, **zoo_nets}
    for i, candidate in enumerate(sample):
        nets[f"proxy{i:02d}"] = {"blocks": ",".join(candidate["blocks"]), "init": "least-squares"}
    chosen = next(c for c in feasible if ",".join(c["blocks"]) == choice)
    rows = zoo_rows + [
        {"row": "DeRy frozen", "kind": "net", "source": "dery", "mode": "frozen", **_cost(chosen)},
        {"row": "DeRy full", "kind": "net", "source": "dery", "mode": "full", **_cost(chosen)},
        {"row": "DeRy from scratch", "kind": "net", "source": "scratch", "mode": "full", **_cost(chosen)},
        {"row": "random assembly", "kind": "net", "source": "random", "mode": "full", **_cost(random_net)},
    ]
    plan = {"search": args.search, "per_class": args.per_class, "budget": search["budget_text"], "limits": limits,
            "feasible": len(feasible), "probe": "run's own training split",
            "head_start": "library default" if listed else "fitted",
            "epochs": args.epochs, "lrs": args.lrs, "seeds": args.seeds, "proxy_epochs": args.proxy_epochs,
            "sample_seed": args.sample_seed, "rows": rows, "nets": nets,
            "proxy_sample": [",".join(c["blocks"]) for c in sample]}
    if args.random_partition:
        add_random_partition(plan, args.random_partition)
    return plan


def add_random_partition(plan: dict, search_path: str) -> None:
    """The row of the search over a random partition: its choice, stitched like DeRy's and fully fine-tuned. The
    search must use the table's budget, or the row would not be comparable."""
    search = json.loads(Path(search_path).read_text())
    if search["budget_text"] != plan["budget"]:
        raise SystemExit(f"{search_path} searched under {search['budget_text']}, the table under {plan['budget']}; "
                         "run the random-partition search with the table's budget")
    choice = search["choice"]["blocks"]
    chosen = next(c for c in search["candidates"] if ",".join(c["blocks"]) == choice)
    plan["random_partition"] = search_path
    plan["nets"]["random-partition"] = {"blocks": choice, "init": "least-squares"}
    plan["rows"].append({"row": "random partition + proxy", "kind": "net", "source": "random-partition",
                         "mode": "full", **_cost(chosen)})


def add_recalibrated(plan: dict) -> None:
    """The row 'DeRy full, norms recalibrated': DeRy's network stitched with ``recalibrate_norms`` (every block's
    batch-norm statistics re-estimated on the probe before the fit reaches it) and fully fine-tuned like DeRy full.
    It tests the repair ``benchmarks/stitch_mode_gap.py`` found for the train/eval mismatch of the initialisation."""
    dery = plan["nets"]["dery"]
    plan["nets"]["dery-recalibrated"] = {**dery, "recalibrate_norms": True}
    full = next(row for row in plan["rows"] if row["row"] == "DeRy full")
    plan["rows"].append({**full, "row": "DeRy full, norms recalibrated", "source": "dery-recalibrated"})


def add_source_rows(plan: dict, epochs: int) -> None:
    """DeRy on the source task (its network stitched for ``SOURCE``, blocks frozen, trained ``epochs`` epochs) and
    the row 'DeRy + source training' (that network, head zeroed, fine-tuned on the target like every row)."""
    dery = plan["nets"]["dery"]
    plan["nets"]["dery-source"] = {**dery, "data": SOURCE}
    plan["source_epochs"] = epochs
    full = next(row for row in plan["rows"] if row["row"] == "DeRy full")
    plan["rows"].append({**full, "row": "DeRy + source training", "source": "dery-source", "after": "source-dery"})


def source_jobs(plan: dict) -> list[dict]:
    from reassembly.stitch.training import RECIPE

    if "dery-source" not in plan["nets"]:
        return []
    return [{"name": "source-dery", "net": "dery-source", "mode": "frozen", "lr": RECIPE.lr, "seed": 0,
             "train": "source-train", "eval": "source-test", "epochs": plan["source_epochs"]}]


def _cost(candidate: dict) -> dict:
    return {"params": candidate["params"], "macs": candidate["macs"]}


def recipe(epochs: int, lr: float):
    from reassembly.stitch.training import RECIPE

    return RECIPE.model_copy(update={"epochs": epochs, "lr": lr, "eval_every": epochs})


def validation_jobs(plan: dict) -> list[dict]:
    return [{"name": f"val-{_slug(row['row'])}-lr{lr:g}", "row": row["row"], "lr": lr, "seed": 0, "train": "fit",
             "eval": "val", "epochs": plan["epochs"]} for row in plan["rows"] for lr in plan["lrs"]]


def proxy_jobs(plan: dict) -> list[dict]:
    from reassembly.stitch.training import RECIPE

    return [{"name": f"proxy-{key}", "net": key, "mode": "full", "lr": RECIPE.lr, "seed": 0, "train": "train",
             "eval": "test", "epochs": plan["proxy_epochs"]} for key in plan["nets"] if key.startswith("proxy")]


def final_jobs(plan: dict, out: Path) -> list[dict] | None:
    """The seeded test runs at each row's chosen rate, or None while a validation run is unfinished."""
    jobs = []
    for row in plan["rows"]:
        scores = {}
        for job in validation_jobs(plan):
            if job["row"] == row["row"]:
                summary = finished(out, job)
                if summary is None:
                    return None
                scores[job["lr"]] = summary["final"]["test_top1"]  # the 'test' set of a validation run is val
        best = max(sorted(scores), key=lambda lr: scores[lr])  # ties: the smaller rate
        row["validation"], row["lr"] = scores, best
        jobs += [{"name": f"test-{_slug(row['row'])}-seed{seed}", "row": row["row"], "lr": best, "seed": seed,
                  "train": "train", "eval": "test", "epochs": plan["epochs"]} for seed in range(plan["seeds"])]
    return sorted(jobs, key=lambda job: job["seed"])  # every row's seed 0 first: a cut-off table still has all rows


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.]+", "-", text.lower())


# ---------------------------------------------------------------- running

def net_key(plan: dict, job: dict) -> tuple[str, str]:
    """(network, split its probe is drawn from) that a training job starts from."""
    row = next((r for r in plan["rows"] if r["row"] == job.get("row")), None)
    key = row["source"] if row else job["net"]
    return key, ("source-train" if key == "dery-source" else job["train"])


def net_dir(plan: dict, out: Path, key: str, split_name: str) -> Path:
    """Where network ``key`` fitted on ``split_name`` is saved (older tables fitted each network once)."""
    return out / "nets" / (f"{key}@{split_name}" if "probe" in plan else key)


def stitch_jobs(plan: dict, out: Path) -> list[dict]:
    """Stitch the networks some unfinished run starts from (all of them for a new table)."""
    jobs = [job for job in proxy_jobs(plan) + source_jobs(plan) if finished(out, job) is None]
    for row in plan["rows"]:
        if row["kind"] != "net":
            continue
        validation = [job for job in validation_jobs(plan) if job["row"] == row["row"]]
        if any(finished(out, job) is None for job in validation):
            jobs += validation + [{**validation[0], "train": "train"}]  # its seeded runs come after these
            continue
        jobs += [job for job in final_jobs({**plan, "rows": [dict(row)]}, out) if finished(out, job) is None]
    needed = {net_key(plan, job) for job in jobs if "stitch" not in job}
    return [{"name": f"stitch-{key}@{split_name}", "stitch": key, "split": split_name}
            for key, split_name in sorted(needed) if key in plan["nets"]]


def stitch_net(plan: dict, key: str, split_name: str, out: Path) -> None:
    from common import stitched_on

    from reassembly.stitch import build_network, parse_blocks, pretrained_block
    from reassembly.stitch.io import save_net
    from reassembly.stitch.stage import stitch_stage

    spec, directory = plan["nets"][key], net_dir(plan, out, key, split_name)
    if "probe" not in plan and spec.get("pretrained", True):  # older tables: the stage's probe, one per network
        stitch_stage(spec["blocks"], TARGET, directory, init=spec["init"], max_per_class=plan["per_class"],
                     recalibrate_norms=spec.get("recalibrate_norms", False), progress=False, overwrite=True)
    elif spec.get("pretrained", True):
        net, report = stitched_on(spec["blocks"], split(split_name, plan["per_class"]))
        save_net(net, directory, {"blocks": spec["blocks"], "init": {**report, "probe_split": split_name}})
    else:  # the architecture of the blocks, freshly initialised: trained from scratch
        torch.manual_seed(0)
        blocks = [pretrained_block(n, a, b, pretrained=False) for n, a, b in parse_blocks(spec["blocks"])]
        save_net(build_network(blocks, 5), directory,
                 {"blocks": spec["blocks"], "init": {"method": "default, blocks from scratch"}})


def model_for(plan: dict, job: dict, out: Path):
    from reassembly.checkpoint import load_into
    from reassembly.stitch.io import load_net
    from reassembly.stitch.training import DEFAULT_HEAD_START, start_head
    from reassembly.zoo.pretrained import load_pretrained

    row = next((r for r in plan["rows"] if r["row"] == job.get("row")), None)
    kind, source, mode = (row["kind"], row["source"], row["mode"]) if row else ("net", job["net"], job["mode"])
    torch.manual_seed(job["seed"])  # a zoo model's new head
    if kind == "zoo":
        return load_pretrained(source, num_classes=5)
    net = load_net(net_dir(plan, out, *net_key(plan, job)))
    if row and row.get("after"):  # trained on the source task first: start from that run's weights
        load_into(net, out / "runs" / row["after"] / "final.safetensors")
    if mode == "frozen":
        net.freeze_blocks(norm="eval")
    elif plan.get("head_start") == "library default":
        start_head(net, DEFAULT_HEAD_START[mode])
    return net


def run_job(plan: dict, job: dict, out: Path, threads: int) -> None:
    from reassembly.train import train_classifier

    torch.set_num_threads(threads)
    if "stitch" in job:
        stitch_net(plan, job["stitch"], job.get("split", "train"), out)
        return
    model = model_for(plan, job, out)
    run_dir = out / "runs" / job["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "device.json", json.dumps(this_machine()) + "\n")
    train_classifier(model, split(job["train"], plan["per_class"]), split(job["eval"], plan["per_class"]),
                     recipe(job["epochs"], job["lr"]), run_dir, seed=job["seed"], progress=False,
                     metadata={"job": job})


def this_machine() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"device": device, "torch": torch.__version__}


def run_machine(out: Path, job: dict) -> str:
    """The machine a run ran on: its own record, else the table's (runs before records were kept)."""
    for path in (out / "runs" / job["name"] / "device.json", out / "machine.json"):
        if path.is_file():
            return json.loads(path.read_text())["device"]
    return "?"


def finished(out: Path, job: dict) -> dict | None:
    if "stitch" in job:
        from reassembly.stitch.io import is_net_dir

        plan = json.loads((out / "plan.json").read_text())
        return {"stitched": True} if is_net_dir(net_dir(plan, out, job["stitch"], job.get("split", "train"))) \
            else None
    path = out / "runs" / job["name"] / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["epochs"] == job["epochs"] else None


def launch(jobs: list[dict], args, out: Path, then=None) -> list[str]:
    """Run the unfinished jobs ``--jobs`` at a time, each in its own process; returns the names that failed.
    ``then()``, asked as jobs finish until it answers, gives jobs to put at the front of the queue."""

    def processes(batch: list[dict]) -> list[Job]:
        return [Job(job["name"], [sys.executable, __file__, "--out", str(out), "--threads", str(args.threads),
                                  "--only", json.dumps(job)], out / "logs" / f"{job['name']}.log")
                for job in batch if finished(out, job) is None]

    def more() -> list[Job] | None:
        batch = then()
        return None if batch is None else processes(batch)

    return run_processes(processes(jobs), args.jobs, more if then is not None else None)


# ---------------------------------------------------------------- report

def proxy_scores(directory: Path) -> dict[str, dict[str, float]]:
    """{proxy: {blocks: score}} from every search file in ``directory`` (each with the proxy it ranked by)."""
    scores = {}
    for path in sorted(directory.glob("*.json")):
        record = json.loads(path.read_text())
        name = record["proxy"]["name"]
        sign = 1 if record["proxy"]["better"] == "higher" else -1
        scores[name] = {",".join(c["blocks"]): sign * c["proxy"] for c in record["candidates"]
                        if c["proxy"] is not None}
    return scores


def report(plan: dict, out: Path, args) -> dict:
    from scipy import stats

    rows = []
    for row in plan["rows"]:
        finals = final_jobs({**plan, "rows": [row]}, out) or []  # each row as far as its own runs go
        values = [finished(out, j) for j in finals if j["row"] == row["row"]]
        top1 = [v["final"]["test_top1"] for v in values if v is not None]
        jobs = [j for j in validation_jobs(plan) + finals if j["row"] == row["row"] and finished(out, j)]
        rows.append({**row, "test_top1": top1, "machines": sorted({run_machine(out, j) for j in jobs}),
                     "mean": statistics.fmean(top1) if top1 else None,
                     "sd": statistics.stdev(top1) if len(top1) > 1 else None})
    proxy = {}
    accuracy = {}
    for job in proxy_jobs(plan):
        summary = finished(out, job)
        if summary is not None:
            accuracy[plan["nets"][job["net"]]["blocks"]] = summary["final"]["test_top1"]
    if args.proxy_scores and accuracy:
        scores = proxy_scores(Path(args.proxy_scores))
        any_record = json.loads(Path(args.search).read_text())["candidates"]
        costs = {",".join(c["blocks"]): c for c in any_record}
        scores["params"] = {b: costs[b]["params"] for b in costs}
        scores["macs"] = {b: costs[b]["macs"] for b in costs}
        nets = sorted(accuracy)
        for name, table in scores.items():
            pairs = [(table[b], accuracy[b]) for b in nets if b in table]
            tau = stats.kendalltau(*zip(*pairs))
            proxy[name] = {"tau": float(tau.statistic), "p": float(tau.pvalue), "n": len(pairs)}
    machine = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else {}
    record = {"command": " ".join(["python", "benchmarks/split_cifar.py", *sys.argv[1:]]), **machine,
              "plan": {k: v for k, v in plan.items() if k != "rows"}, "rows": rows,
              "proxy_accuracy": accuracy, "proxy_tau": proxy, "source_task": source_task(plan, out)}
    write_report(args.report, record, markdown(record))
    return record


def source_task(plan: dict, out: Path) -> dict | None:
    """DeRy's network trained on the source task (blocks frozen) next to each zoo model's own source accuracy."""
    from reassembly.zoo.pretrained import load_manifest

    jobs = source_jobs(plan)
    summary = finished(out, jobs[0]) if jobs else None
    if summary is None:
        return None
    zoo = {entry.name: entry.test_accuracy for entry in load_manifest() if entry.source_data == SOURCE}
    return {"data": SOURCE, "blocks": plan["nets"]["dery-source"]["blocks"], "epochs": jobs[0]["epochs"],
            "mode": "frozen", "test_top1": summary["final"]["test_top1"], "zoo_test_top1": zoo,
            "machine": run_machine(out, jobs[0])}


def markdown(r: dict) -> str:
    p = r["plan"]
    lines = ["# Split-CIFAR: reassembly against the zoo under one budget", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {r.get('device', '?')} unless a row says otherwise, torch {r.get('torch', '?')}. Target `{TARGET}`, {p['per_class']} training "
             f"images per class, all 5,000 test images. Budget {p['budget']} ({p['feasible']} feasible networks). "
             f"{p['epochs']} epochs per run; learning rate chosen from {p['lrs']} on a validation split; "
             f"{p['seeds']} seeds at the chosen rate.", "",
             "| row | params | MACs | chosen lr (val top-1 per lr) | test top-1 % (mean ± sd) | per seed |",
             "|---|---:|---:|---|---:|---|"]
    for row in r["rows"]:
        val = ", ".join(f"{lr:g}: {acc:.1f}" for lr, acc in sorted((float(k), v) for k, v in
                                                                    row.get("validation", {}).items()))
        score = f"{row['mean']:.2f} ± {row['sd']:.2f}" if row["sd"] is not None else (
            f"{row['mean']:.2f}" if row["mean"] is not None else "unfinished")
        elsewhere = [m for m in row.get("machines", []) if m != r.get("device")]
        name = row["row"] + (f" (run on {', '.join(elsewhere)})" if elsewhere else "")
        lines.append(f"| {name} | {row['params']:,} | {row['macs']:,} | {row.get('lr', '?')} ({val}) | "
                     f"{score} | {', '.join(f'{v:.2f}' for v in row['test_top1'])} |")
    source = r.get("source_task")
    if source:
        zoo = ", ".join(f"{name} {top1:.2f}" for name, top1 in sorted(source["zoo_test_top1"].items(),
                                                                       key=lambda item: -item[1]))
        lines += ["", (f"DeRy on the source task `{source['data']}` (DeRy's Table 7): `{source['blocks']}` stitched "
                       f"for it, blocks frozen, stem, stitches and head trained {source['epochs']} epochs on its "
                       f"training split: **{source['test_top1']:.2f} %** test top-1 (on {source['machine']}). The zoo "
                       f"models' own accuracy there: {zoo}.")]
    if r["proxy_tau"]:
        lines += ["", f"Proxy quality over {len(r['proxy_accuracy'])} random feasible networks, each fully fine-tuned "
                  f"{p['proxy_epochs']} epochs (lr of the recipe, seed 0), test top-1 against the score:", "",
                  "| score | Kendall tau | p | networks |", "|---|---:|---:|---:|"]
        for name, t in sorted(r["proxy_tau"].items(), key=lambda item: -item[1]["tau"]):
            lines.append(f"| {name} | {t['tau']:+.3f} | {t['p']:.3g} | {t['n']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", default="results/search/split-cifar-naswot-0.5M-60M-all.json",
                        help="a search.json that scored every feasible network (--top-k at least their number)")
    parser.add_argument("--proxy-scores", default=None, help="folder of such search files, one per proxy")
    parser.add_argument("--random-partition", default=None,
                        help="a search.json over a random partition (`reassembly partition --random`), same budget: "
                             "adds the 'random partition + proxy' row")
    parser.add_argument("--recalibrated", action="store_true",
                        help="adds the row 'DeRy full, norms recalibrated' (`reassembly stitch --recalibrate-norms`)")
    parser.add_argument("--source-rows", action="store_true",
                        help="adds DeRy on the source task (a report section) and the row 'DeRy + source training'")
    parser.add_argument("--source-epochs", type=int, default=15, help="epochs on the source task (the zoo's 15)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="train only these rows (by name, e.g. 'DeRy full'); the report still lists every row")
    parser.add_argument("--out", type=Path, default=Path("runs/split-cifar-table"))
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="training images per class (smoke runs)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--proxy-nets", type=int, default=24)
    parser.add_argument("--proxy-epochs", type=int, default=3)
    parser.add_argument("--sample-seed", type=int, default=0)
    add_run_options(parser)
    args = parser.parse_args()
    out = args.out
    plan_path = out / "plan.json"
    if args.only:
        run_job(json.loads(plan_path.read_text()), json.loads(args.only), out, args.threads)
        return
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        asked = {"epochs": args.epochs, "lrs": args.lrs, "seeds": args.seeds, "per_class": args.per_class,
                 "proxy_epochs": args.proxy_epochs, "sample_seed": args.sample_seed}
        changed = [key for key, value in asked.items() if plan[key] != value]
        if changed and not args.report_only:
            raise SystemExit(f"{out} holds a plan with other {', '.join(changed)}; use another --out for new settings")
        if args.random_partition and "random_partition" not in plan and not args.report_only:
            add_random_partition(plan, args.random_partition)
            plan_path.write_text(json.dumps(plan, indent=2) + "\n")
        if args.recalibrated and "dery-recalibrated" not in plan["nets"] and not args.report_only:
            add_recalibrated(plan)
            plan_path.write_text(json.dumps(plan, indent=2) + "\n")
        if args.source_rows and "dery-source" not in plan["nets"] and not args.report_only:
            add_source_rows(plan, args.source_epochs)
            plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    else:
        plan = build_plan(args)
        if args.recalibrated:
            add_recalibrated(plan)
        if args.source_rows:
            add_source_rows(plan, args.source_epochs)
        out.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    names = [row["row"] for row in plan["rows"]]
    unknown = sorted(set(args.rows or []) - set(names))
    if unknown:
        raise SystemExit(f"--rows {', '.join(unknown)}: the plan's rows are {', '.join(names)}")
    chosen = plan
    if args.rows:  # those rows, and no proxy runs
        rows = [row for row in plan["rows"] if row["row"] in args.rows]
        chosen = {**plan, "rows": rows, "nets": {k: v for k, v in plan["nets"].items()
                                                 if k in {row["source"] for row in rows}}}
        if "dery-source" not in chosen["nets"]:
            chosen.pop("source_epochs", None)
    if not args.report_only:
        if not (out / "machine.json").is_file():  # the table's machine; each run also records its own
            write_text(out / "machine.json", json.dumps(this_machine()))
        target_splits(plan["per_class"])  # decode the images once before the workers start
        failed = launch(stitch_jobs(chosen, out), args, out)
        failed += launch(source_jobs(chosen), args, out)  # 'DeRy + source training' starts from it
        failed += launch(validation_jobs(chosen) + proxy_jobs(chosen), args, out, then=lambda: final_jobs(chosen, out))
        if failed:
            print(f"failed runs: {', '.join(failed)}; see {out}/logs", flush=True)
    report(plan, out, args)


if __name__ == "__main__":
    main()
