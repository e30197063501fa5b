"""MDA assembly (issue 11): components of different models joined into one 6-class CIFAR-10 classifier.

Every component is made with the command line, exactly as a user would (`reassembly disassemble ... --calibrate`:
50 most confident correct training images per class from the whole training split, thresholds calibrated on 500
other training images per class), then joined with `reassembly assemble` with and without `--scale` (parameter
scaling on 200 training images per class, seed 0). Each assembly is scored on the 6,000 CIFAR-10 test images of
classes 0-5 (argmax over its 6 logits). For reference, the same joins are made of the *unpruned* source models (every
channel kept, head restricted to the component's classes: what assembly costs without any disassembly), and the
share of test images whose prediction lands in the other component's classes is given. A same-architecture pair
(vgg16_cifar10 {0,1,2} + {3,4,5}) is also merged block-diagonally (`--merge block-diagonal`), to show that it
computes the parallel assembly's logits while counting its zero blocks as parameters.

    PYTHONPATH=src python benchmarks/lego_assembly.py --work runs/lego --out results/lego/assembly

The component and assembly folders go to ``--work`` (re-used when present; not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import reassembly as ra
from reassembly.data import Preprocess, normalization_of
from reassembly.lego import (
    accumulate_contributions,
    assemble,
    count_params_macs,
    extract_component,
    load_component,
    load_lego,
    locate_component,
    scale_head,
)
from reassembly.lego.report import logits_in_batches

sys.path.insert(0, str(Path(__file__).parent))
from common import write_report

R20 = ("cifar_resnet20", "../shared/models/akamaster-cifar10-resnet/resnet20-12fca82f.th")
COMPONENTS = {  # folder: (model, checkpoint or None for a shipped model, classes)
    "r20-012": (*R20, "0,1,2"),
    "vgg-345": ("vgg16_cifar10", None, "3,4,5"),
    "mbv2-345": ("mobilenetv2_cifar10", None, "3,4,5"),
    "vgg-012": ("vgg16_cifar10", None, "0,1,2"),
}
PAIRS = [("r20-012", "vgg-345"), ("r20-012", "mbv2-345")]
SAME = ("vgg-012", "vgg-345")
CLASSES = list(range(6))


def cli(args: list[str], threads: int) -> tuple[list[str], float]:
    """Run `reassembly ARGS` (one torch thread) and return the command as typed and its wall time."""
    command = ["reassembly", *args]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "reassembly", *args], check=False, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    print(result.stdout, end="", flush=True)
    return command, round(time.perf_counter() - started, 1)


def logits_of(model, images, batch_size=500):
    """The model's logits for raw test images, standardised the way the model expects."""
    return logits_in_batches(model, Preprocess(*normalization_of(model))(images), batch_size)


def score(model, test, components_classes) -> dict:
    """6-way accuracy, per class, and the share of images predicted in another component's classes."""
    logits = logits_of(model, test.images)
    pred = torch.tensor(model.reassembly_classes)[logits.argmax(1)]
    labels = test.labels
    owner = {c: i for i, cs in enumerate(components_classes) for c in cs}
    crossed = torch.tensor([owner[int(p)] != owner[int(t)] for p, t in zip(pred, labels)])
    return {"accuracy": round(100 * (pred == labels).double().mean().item(), 2),
            "per_class": {str(c): round(100 * (pred[labels == c] == c).double().mean().item(), 2) for c in CLASSES},
            "crossed_to_other_component": round(100 * crossed.double().mean().item(), 2)}


def unpruned(model_name, checkpoint, classes, dataset="cifar10"):
    """The source model with every channel kept and its head restricted to ``classes`` (the no-disassembly
    reference), made by the same extraction code."""
    model = (ra.create_model(model_name, checkpoint=checkpoint) if checkpoint
             else ra.create_model(model_name, pretrained=True)).eval()
    x, labels = torch.zeros(10, 3, 32, 32), torch.arange(10)
    contributions = accumulate_contributions(model, x, labels, 10)
    keep_all = {"conv": -1.0, "linear": -1.0}
    masks = locate_component(model, contributions, classes, alpha=keep_all, beta=keep_all, model_name=model_name)
    assert all(len(l.keep_in) == l.in_channels for l in masks.layers.values())
    return extract_component(model, masks, dataset=dataset)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/lego", help="folder for the component and assembly folders")
    ap.add_argument("--out", default=None, help="directory for results.json + report.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    commands, seconds = {}, {}
    for name, (model, checkpoint, classes) in COMPONENTS.items():
        cmd = ["disassemble", model, *(["--checkpoint", checkpoint] if checkpoint else []), "--classes", classes,
               "--data", "cifar10", "--calibrate", "--threads", str(args.threads), "--out", str(work / name)]
        if (work / name / "component.json").is_file():
            commands[name] = ["reassembly", *cmd]
            continue
        commands[name], seconds[name] = cli(cmd, args.threads)
    train = ra.load_dataset("cifar10", "train")
    test = ra.load_dataset("cifar10", "test")
    test = test.subset(torch.nonzero(test.labels < 6)[:, 0])
    rows = []
    for a, b in PAIRS:
        parts_classes = [[int(c) for c in COMPONENTS[n][2].split(",")] for n in (a, b)]
        parts = [load_component(work / n) for n in (a, b)]
        row = {"components": [a, b], "sources": [COMPONENTS[n][0] for n in (a, b)],
               "classes": parts_classes, "params_of_parts": [count_params_macs(p, (3, 32, 32))[0] for p in parts],
               "macs_of_parts": [count_params_macs(p, (3, 32, 32))[1] for p in parts],
               "component_reports": [json.loads((work / n / "report.json").read_text()) for n in (a, b)]}
        for scaled in (False, True):
            out = work / f"{a}+{b}{'-scaled' if scaled else ''}"
            cmd = ["assemble", str(work / a), str(work / b), *(["--scale"] if scaled else []), "--out", str(out)]
            if not (out / "assembly.json").is_file():
                commands[out.name], seconds[out.name] = cli(cmd, args.threads)
            else:
                commands[out.name] = ["reassembly", *cmd]
            assembly = load_lego(out)
            params, macs = count_params_macs(assembly, (3, 32, 32))
            key = "scaled" if scaled else "unscaled"
            row[key] = {**score(assembly, test, parts_classes), "params": params, "macs": macs, "folder": str(out),
                        "eval_command": f"reassembly eval --model {out} --data 'cifar10[0:6]'"}
            if scaled:
                row[key]["ratios"] = [c.get("scaling", {}).get("ratios")
                                      for c in assembly.reassembly_assembly["components"]]
        # the same joins of the unpruned source models (no disassembly)
        full = [unpruned(COMPONENTS[n][0], COMPONENTS[n][1], cs) for n, cs in zip((a, b), parts_classes)]
        row["unpruned_unscaled"] = score(assemble(full), test, parts_classes)
        for f in full:
            scale_head(f, train, per_class=200, seed=0)
        row["unpruned_scaled"] = score(assemble(full), test, parts_classes)
        row["unpruned_params"] = sum(count_params_macs(f, (3, 32, 32))[0] for f in full)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "component_reports"}), flush=True)

    # one architecture: block-diagonal merge against the parallel assembly
    a, b = SAME
    merged_dir = work / f"{a}+{b}-block-diagonal"
    cmd = ["assemble", str(work / a), str(work / b), "--merge", "block-diagonal", "--out", str(merged_dir)]
    if not (merged_dir / "assembly.json").is_file():
        commands[merged_dir.name], seconds[merged_dir.name] = cli(cmd, args.threads)
    else:
        commands[merged_dir.name] = ["reassembly", *cmd]
    merged = load_lego(merged_dir)
    parallel = assemble([load_component(work / a), load_component(work / b)])
    got, want = logits_of(merged, test.images), logits_of(parallel, test.images)
    same = {"components": [a, b], "max_abs_logit_difference": float((got - want).abs().max()),
            "same_predictions": bool(torch.equal(got.argmax(1), want.argmax(1))),
            "params_block_diagonal": count_params_macs(merged, (3, 32, 32))[0],
            "params_parallel": count_params_macs(parallel, (3, 32, 32))[0],
            "macs_block_diagonal": count_params_macs(merged, (3, 32, 32))[1],
            "macs_parallel": count_params_macs(parallel, (3, 32, 32))[1],
            "accuracy": score(parallel, test, [[0, 1, 2], [3, 4, 5]])["accuracy"]}
    print(json.dumps(same), flush=True)
    record = {"command": "PYTHONPATH=src python benchmarks/lego_assembly.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"shared 2-core CPU ({platform.processor() or platform.machine()}), torch "
                         f"{torch.__version__}, {args.threads} thread(s), other jobs running",
              "seeds": {"held_out_draw": 0, "scaling_draw": 0},
              "commands": {k: " ".join(v) for k, v in commands.items()}, "seconds": seconds,
              "test_images": len(test), "rows": rows, "block_diagonal": same}
    write_report(args.out, record, markdown(record))


def markdown(record) -> str:
    lines = ["# MDA assembly: components of two different models, one 6-class classifier (issue 11)", "",
             f"Command: `{record['command']}`  ", f"Machine: {record['machine']}  ",
             (f"Seeds: held-out draw {record['seeds']['held_out_draw']}, scaling draw "
              f"{record['seeds']['scaling_draw']}"), "",
             "The components and assemblies were made with these commands:", "", "```"]
    lines += [record["commands"][k] for k in record["commands"]]
    lines += ["```", "",
              (f"Accuracy on the {record['test_images']:,} CIFAR-10 test images of classes 0-5 (argmax over the "
               "assembly's 6 logits). \"unpruned\": the same join of the source models with every channel kept "
               "(heads restricted to the same classes), the reference without disassembly. \"crossed\": share of "
               "test images predicted as a class of the other component."), "",
              ("| components | parameters: assembly / sum of parts | unscaled | scaled | crossed (unscaled -> "
               "scaled) | unpruned: unscaled / scaled |"), "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        names = " + ".join(f"{s} {{{','.join(map(str, c))}}}" for s, c in zip(r["sources"], r["classes"]))
        u, s = r["unscaled"], r["scaled"]
        lines.append(f"| {names} | {u['params']:,} / {sum(r['params_of_parts']):,} | {u['accuracy']:.2f} | "
                     f"{s['accuracy']:.2f} | {u['crossed_to_other_component']:.2f} -> "
                     f"{s['crossed_to_other_component']:.2f} | {r['unpruned_unscaled']['accuracy']:.2f} / "
                     f"{r['unpruned_scaled']['accuracy']:.2f} |")
    lines += ["", "Per class (scaled assembly):", "", "| components | " + " | ".join(map(str, CLASSES)) + " |",
              "|---|" + "---|" * len(CLASSES)]
    for r in record["rows"]:
        per = r["scaled"]["per_class"]
        lines.append(f"| {' + '.join(r['components'])} | " + " | ".join(f"{per[str(c)]:.1f}" for c in CLASSES) + " |")
    lines += ["", "The components themselves (their own 3 classes, test split, from each folder's report.json):", "",
              ("| component | original (3-class) | component | params kept | MACs kept | thresholds (calibrated) | "
               "calibration target met (held-out training images) |"),
              "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in record["rows"]:
        for name, rep in zip(r["components"], r["component_reports"]):
            if name in seen:
                continue
            seen.add(name)
            a, b = rep["thresholds"]["alpha"], rep["thresholds"]["beta"]
            cal = rep["calibration"]
            met = (f"{'yes' if cal['met'] else '**no**'} ({cal['tried'][cal['chosen']]['accuracy']:.2f} vs "
                   f"{cal['original_accuracy']:.2f})")
            lines.append(f"| {name} | {rep['accuracy']['original']:.2f} | {rep['accuracy']['component']:.2f} | "
                         f"{100 * rep['params']['ratio']:.1f} % | {100 * rep['macs']['ratio']:.1f} % | conv "
                         f"{a['conv']}/{b['conv']}, linear {a['linear']}/{b['linear']} | {met} |")
    bd = record["block_diagonal"]
    lines += ["", (f"Same architecture ({' + '.join(bd['components'])}): the block-diagonal merge's logits differ from "
                   f"the parallel assembly's by at most {bd['max_abs_logit_difference']:.1e} on the test images "
                   f"(same predictions: {bd['same_predictions']}; accuracy {bd['accuracy']:.2f} %), but it has "
                   f"{bd['params_block_diagonal']:,} parameters and {bd['macs_block_diagonal']:,} MACs against "
                   f"{bd['params_parallel']:,} and {bd['macs_parallel']:,} for the parallel assembly (the zero "
                   "blocks count).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
