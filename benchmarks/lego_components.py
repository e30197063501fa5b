"""Extracted MDA components vs their source models (issue 11): accuracy on the chosen classes, params, MACs.

For each model (trained on all of CIFAR-10) and the class set: select ``--per-class`` correctly classified training
images per chosen class (the most confident, from a seeded draw of ``--pool`` training images of each class), compute
contributions, locate the component at the official thresholds (conv 0.3/0.2, linear 0.4/0.3), at the milder
conv 0.1/0.0, and at the thresholds ``reassembly.lego.calibrate_thresholds`` picks (the fewest parameters over its
grid whose accuracy on ``--held-out`` other training images per class, never test images, is at least the
original's on the same images; where no grid point is, the best one with the layers whose pruning costs accuracy
kept whole), physically extract it (``reassembly.lego.extract``) and evaluate it on every
CIFAR-10 test image of those classes. The original is scored with the argmax over the chosen classes' logits only ("restricted": the same
decision the component's head makes) and, for reference, over all logits. Params count every parameter; MACs count
conv/linear multiply-accumulates for one 32x32 image. ``mask_vs_component`` is the largest logit difference
between the component and the full model with the dropped input channels zeroed (must be ~0: extraction = masking).
Each component is saved (safetensors + JSON) and loaded back; ``reload_equal`` says the reloaded one gives the
same logits.

    PYTHONPATH=src python benchmarks/lego_components.py --out results/lego/components

With ``--out``, each model's rows are kept in ``OUT/models/MODEL.json`` as it finishes: the same command run
again reuses them (same classes, samples, held-out count and criterion) and redoes only the missing models.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import reassembly as ra
from reassembly.data import Preprocess
from reassembly.io import write_text
from reassembly.lego import accumulate_contributions, select_samples
from reassembly.lego.calibrate import calibrate_thresholds, held_out_indices
from reassembly.lego.extract import (
    count_params_macs,
    extract_component,
    load_component,
    save_component,
)
from reassembly.lego.locate import locate_component
from reassembly.lego.report import logits_in_batches
from reassembly.train.evaluate import resolve_normalization

sys.path.insert(0, str(Path(__file__).parent))
from common import write_report
from lego_check import masked_logits

MODELS = {
    "cifar_resnet20": {"checkpoint": "../shared/models/akamaster-cifar10-resnet/resnet20-12fca82f.th"},
    "vgg16_cifar10": {"pretrained": True},
    "mobilenetv2_cifar10": {"pretrained": True},
}
SETTINGS = {"official": ({}, {}), "conv 0.1/0.0": ({"conv": 0.1}, {"conv": 0.0}), "calibrated": None}


def pool_indices(train, per_class: int, seed: int = 0):
    """The images ``load_dataset(..., max_per_class=per_class, seed=seed)`` keeps, as indices into the whole split."""
    import numpy as np

    labels, rng = train.labels.numpy(), np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(train.num_classes)]))


def run_model(name, classes, per_class, pool, train, pool_index, held_out, test, match_loss=False) -> list[dict]:
    t0 = time.perf_counter()
    train_pool = train.subset(pool_index)
    model = ra.create_model(name, **MODELS[name]).eval()
    mean, std = resolve_normalization(model, None, None)
    chosen = select_samples(model, train_pool, per_class, classes=classes)
    index, labels = chosen.flat()
    inputs = Preprocess(mean, std)(train_pool.images[index])
    contrib = accumulate_contributions(model, inputs, labels, train_pool.num_classes)
    rows = torch.nonzero(torch.isin(test.labels, torch.tensor(classes)))[:, 0]
    x = Preprocess(mean, std)(test.images[rows])
    local = torch.tensor([classes.index(int(c)) for c in test.labels[rows]])
    full = logits_in_batches(model, x)
    params, macs = count_params_macs(model, tuple(test.image_size))
    base = {
        "model": name, "classes": classes, "per_class": per_class, "pool": pool, "test_images": len(rows),
        "original_all_logits": round(100 * (full.argmax(1) == test.labels[rows]).double().mean().item(), 2),
        "original_restricted": round(100 * (full[:, classes].argmax(1) == local).double().mean().item(), 2),
        "original_params": params, "original_macs": macs,
    }
    out = []
    for setting, thresholds in SETTINGS.items():
        t1 = time.perf_counter()
        calibration = None
        if thresholds is None:  # held out: training images of the classes outside the pool (never test images)
            rest = held_out_indices(train, classes, pool_index, held_out, seed=0)
            calibration = calibrate_thresholds(model, contrib, classes, train.subset(rest),
                                               input_size=tuple(test.image_size), model_name=name,
                                               match_loss=match_loss)
            masks = calibration.masks
        else:
            masks = locate_component(model, contrib, classes, input_size=tuple(test.image_size), alpha=thresholds[0],
                                     beta=thresholds[1], model_name=name)
        component = extract_component(model, masks)
        t_extract = time.perf_counter() - t1
        got = logits_in_batches(component, x)
        masked = masked_logits(model, masks, x, "in")[:, classes]
        c_params, c_macs = count_params_macs(component, tuple(test.image_size))
        with tempfile.TemporaryDirectory() as tmp:
            save_component(component, tmp)
            again = load_component(tmp)
            reload_equal = bool(torch.equal(logits_in_batches(again, x[:200]), got[:200]))
        out.append({**base, "setting": setting, "alpha": masks.alpha, "beta": masks.beta,
                    "component": round(100 * (got.argmax(1) == local).double().mean().item(), 2),
                    "component_params": c_params, "component_macs": c_macs,
                    "params_ratio": round(c_params / params, 3), "macs_ratio": round(c_macs / macs, 3),
                    "mask_vs_component": float((got - masked).abs().max()), "reload_equal": reload_equal,
                    "seconds_locate_extract": round(t_extract, 1), "seconds_model": round(time.perf_counter() - t0, 1),
                    "calibration": calibration.to_dict() if calibration else None})
        print(out[-1], flush=True)
    return out


def markdown(record) -> str:
    lines = [
        "# MDA components extracted (issue 11)", "",
        f"Command: `{record['command']}`  ", f"Machine: {record['machine']}", "",
        (f"Classes {record['classes']}, {record['per_class']} training samples per class (the most confident correct "
         f"ones of a seeded draw of {record['pool']} training images per class, seed 0), "
         f"{record['rows'][0]['test_images']} test images. Accuracy: argmax over the chosen classes' logits "
         "(original) / the component's head. Params: all parameters; MACs: conv/linear at 32x32."), "",
        ("| model | thresholds | original (all 10) | original (3-class) | component | >= original? | params | MACs | "
         "mask = component (max abs diff) | reload equal |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        ok = "yes" if r["component"] >= r["original_restricted"] else "**no**"
        setting = r["setting"]
        if r.get("calibration"):
            a, b = r["alpha"], r["beta"]
            whole = r["calibration"].get("kept_whole") or []
            setting += (f" (conv {a['conv']}/{b['conv']}, linear {a['linear']}/{b['linear']}"
                        f"{', kept whole: ' + ', '.join(whole) if whole else ''})")
        lines.append(
            f"| {r['model']} | {setting} | {r['original_all_logits']} | {r['original_restricted']} | "
            f"{r['component']} | {ok} | {r['component_params'] / 1e6:.3f} M / {r['original_params'] / 1e6:.3f} M "
            f"({100 * r['params_ratio']:.1f} %) | {r['component_macs'] / 1e6:.1f} M / {r['original_macs'] / 1e6:.1f} M "
            f"({100 * r['macs_ratio']:.1f} %) | {r['mask_vs_component']:.1e} | {r['reload_equal']} |")
    lines += ["", ("Calibration (`reassembly.lego.calibrate_thresholds`): held-out training images of the chosen classes "
                   "(not among the contribution samples, not test images); the original's accuracy on them (argmax "
                   "over the chosen classes) is the target; grid points are tried from the fewest parameters up "
                   "until one reaches it; if none does, each layer the most accurate one prunes is scored alone, and "
                   "the layers whose pruning costs accuracy are kept whole, costliest first, until the target is "
                   "reached (held-out accuracy after each restoration in brackets)"
                   + (". With `--match-loss` the component's held-out cross-entropy over the classes must not exceed "
                      "the original's either, and every pruned layer is restored in the order of the loss its "
                      "pruning alone adds (held-out accuracy / cross-entropy in brackets)."
                      if record.get("match_loss") else "") + ":"), "",
              ("| model | held-out images | original (held-out) | chosen: component (held-out) | target met | "
               "grid points evaluated | layers scored alone, then restored |"), "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        cal = r.get("calibration")
        if cal:
            grid = [t for t in cal["tried"] if not t.get("kept_whole")]
            evaluated = sum(t["accuracy"] is not None and t["same_as"] is None for t in grid)
            restored = [t for t in cal["tried"] if t.get("kept_whole")]
            costs = cal.get("layer_costs") or {}
            repair = (f"{len(costs)}, then {len(restored)} ("
                      + ", ".join(f"{t['kept_whole'][-1]}: {_score(t, cal)}" for t in restored if t["same_as"] is None)
                      + ")") if costs else "-"
            lines.append(f"| {r['model']} | {cal['held_out_images']} | {_score(cal, cal, 'original_')} | "
                         f"{_score(cal['tried'][cal['chosen']], cal)} | {'yes' if cal['met'] else '**no**'} | "
                         f"{evaluated} of {len(grid)} | {repair} |")
    return "\n".join(lines) + "\n"


def _score(row, cal, prefix=""):
    """Held-out accuracy, and cross-entropy where the calibration matched it too."""
    accuracy = row[prefix + "accuracy"]
    return f"{accuracy} / {row[prefix + 'loss']:.4f}" if cal.get("match_loss") else f"{accuracy}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--classes", default="0,1,2")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--pool", type=int, default=300, help="training images per class to select from")
    ap.add_argument("--held-out", type=int, default=5000,
                    help="training images per class outside the pool that calibrate the thresholds (at most; the "
                         "default takes all of them, 4,700 per class: with 500, grid points 1-3 images apart decided)")
    ap.add_argument("--match-loss", action="store_true",
                    help="calibrate with calibrate_thresholds(..., match_loss=True): held-out cross-entropy too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory for results.json + report.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    train = ra.load_dataset("cifar10", "train")
    pool_index = pool_indices(train, args.pool)  # = load_dataset(..., max_per_class=pool), as indices
    test = ra.load_dataset("cifar10", "test")
    rows = []
    settings = {"classes": classes, "per_class": args.per_class, "pool": args.pool, "held_out": args.held_out,
                "match_loss": args.match_loss}
    for name in args.models.split(","):
        done = Path(args.out, "models", f"{name}.json") if args.out else None  # resume: one file per model
        saved = json.loads(done.read_text()) if done and done.exists() else None
        if saved and saved["settings"] == settings:
            rows += saved["rows"]
            print(f"{name}: reusing {done}", flush=True)
            continue
        got = run_model(name, classes, args.per_class, args.pool, train, pool_index, args.held_out, test,
                        args.match_loss)
        if done:
            write_text(done, json.dumps({"settings": settings, "rows": got}))
        rows += got
    record = {"command": "PYTHONPATH=src python benchmarks/lego_components.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"shared 2-core CPU ({platform.processor() or platform.machine()}), torch "
                         f"{torch.__version__}, {args.threads} thread(s), other jobs running",
              "classes": classes, "per_class": args.per_class, "pool": args.pool, "held_out": args.held_out,
              "match_loss": args.match_loss, "seeds": {"pool_draw": 0, "held_out_draw": 0}, "rows": rows}
    write_report(args.out, record, markdown(record))


if __name__ == "__main__":
    main()
