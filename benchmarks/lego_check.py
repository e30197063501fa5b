"""Masking check of an MDA component (issue 11): how accurate is the component that `reassembly.lego` locates?

For a zoo model trained on all of CIFAR-10 and a class subset, this selects samples from the training split, computes
contributions, locates the component and evaluates it on the test images of those classes by *masking* the full
model, which for a plain chain (VGG) equals pruning:

* ``in``   zero every dropped input channel of each conv/linear layer (forward pre-hook). A dropped channel of a
           chain is produced by exactly one conv + BN + ReLU and read by exactly one layer, so this is what
           physically removing it does.
* ``out``  zero every dropped output channel of each conv/linear layer right after the layer, i.e. BEFORE batch
           norm. NOT equivalent to pruning: BN then outputs ``beta - gamma * mean / sqrt(var + eps)`` for the channel,
           a constant that ReLU may pass on. Reported to show how much that mistake costs.

Diagnostics, not part of MDA: ``mask_in_bn_recalibrated`` re-estimates BN statistics on the selected training
samples with the masks applied; ``mask_in_mean_compensated`` adds each layer's mean dropped-input contribution (from
the full model on the selected samples) as a bias. ``--per-layer`` masks one layer at a time; ``--sweep`` relocates
with other conv thresholds from the same contributions.

The component's argmax runs over the chosen classes' logits only (the head keeps exactly those); the full model is
reported with the argmax over all logits and over the chosen ones. Params/MACs of the component are counted from
the masks (conv/linear weights and biases, BN affine; MACs of conv/linear at the given input size).

    PYTHONPATH=src python benchmarks/lego_check.py --classes 0,1,2 --per-class 50
    PYTHONPATH=src python benchmarks/lego_check.py --classes 0,1,2 --fraction 1.0        # every correct image
    PYTHONPATH=src python benchmarks/lego_check.py --classes 0,1,2 --alpha-conv 0.1 --beta-conv 0.1

Prints one JSON line per run (``--json`` appends it to a file).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import reassembly as ra
from reassembly.data import Preprocess
from reassembly.lego import accumulate_contributions, select_samples
from reassembly.lego.locate import locate_component
from reassembly.train.evaluate import resolve_normalization


def masked_logits(model, masks, inputs, mode: str, kinds=("conv", "linear"), batch_size=500, only=None,
                  bias=None):
    """Logits of ``model`` with the component's dropped channels zeroed (see the module docstring)."""
    modules = dict(model.named_modules())
    handles = []
    for name, layer in masks.layers.items():
        if layer.kind not in kinds or only is not None and name != only:
            continue
        module = modules[name]
        if mode == "in":
            keep = torch.zeros(layer.in_channels, dtype=torch.bool)
            keep[layer.keep_in] = True
            shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (1, -1)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, keep=keep, shape=shape: (args[0] * keep.view(shape).to(args[0].dtype),)))
            if bias is not None and name in bias:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, b=bias[name], shape=shape: out + b.view(shape).to(out.dtype)))
        else:
            keep = torch.zeros(layer.out_channels, dtype=torch.bool)
            keep[layer.keep_out] = True
            shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (1, -1)
            handles.append(module.register_forward_hook(
                lambda m, args, out, keep=keep, shape=shape: out * keep.view(shape).to(out.dtype)))
    try:
        with torch.no_grad():
            return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def compensations(model, masks, inputs, batch_size=250) -> dict[str, torch.Tensor]:
    """Per conv/linear layer, the mean (over ``inputs`` and output positions) of what its DROPPED input channels add
    to each output channel, measured in the full model. Adding it as a bias after zeroing those inputs is what
    pruning them and folding their mean contribution into the layer's bias (or its BN's running mean) does."""
    modules = dict(model.named_modules())
    sums, hooks = {}, []
    for name, layer in masks.layers.items():
        module = modules[name]
        drop = torch.ones(layer.in_channels, dtype=torch.bool)
        drop[layer.keep_in] = False
        if not drop.any():
            continue

        def hook(m, args, out, name=name, drop=drop):
            x = args[0]
            if isinstance(m, nn.Conv2d):
                part = m._conv_forward(x * drop.view(1, -1, 1, 1).to(x.dtype), m.weight, None).mean((2, 3))
            else:
                part = (x * drop.to(x.dtype)) @ m.weight.T
            sums[name] = sums.get(name, 0) + part.double().sum(0)
        hooks.append(module.register_forward_hook(hook))
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {name: (total / len(inputs)).float() for name, total in sums.items()}


@torch.no_grad()
def compensations_sequential(model, masks, inputs) -> dict[str, torch.Tensor]:
    """Like :func:`compensations`, but measured in the masked model itself, layer after layer: one forward pass of
    all ``inputs`` in which each layer's bias is computed from its actual (already masked and compensated)
    input, then applied before the next layer runs."""
    modules = dict(model.named_modules())
    bias, handles = {}, []
    for name, layer in masks.layers.items():
        module = modules[name]
        keep = torch.zeros(layer.in_channels, dtype=torch.bool)
        keep[layer.keep_in] = True
        conv = isinstance(module, nn.Conv2d)
        shape = (1, -1, 1, 1) if conv else (1, -1)

        def pre(m, args, name=name, keep=keep, shape=shape, conv=conv):
            x = args[0]
            dropped = x * (~keep).view(shape).to(x.dtype)
            part = m._conv_forward(dropped, m.weight, None).mean((0, 2, 3)) if conv else (dropped @ m.weight.T).mean(0)
            bias[name] = part
            return (x * keep.view(shape).to(x.dtype),)

        def post(m, args, out, name=name, shape=shape):
            return out + bias[name].view(shape)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        model(inputs)
    finally:
        for h in handles:
            h.remove()
    return bias


def recalibrated(model, masks, inputs, batch_size=250):
    """A copy of ``model`` whose batch-norm statistics are re-estimated on ``inputs`` (the selected training
    samples) with the component's masks applied: no gradient step, BN running mean/var only."""
    import copy

    twin = copy.deepcopy(model).eval()
    norms = [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    masked_logits(twin, masks, inputs, "in", batch_size=batch_size)
    return twin.eval()


def component_size(model, masks, input_size) -> dict:
    """Params and MACs of the full model's conv/linear/BN layers and of the component (counted from the masks)."""
    spatial = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: spatial.__setitem__(n, o[0, 0].numel()))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    names = list(modules)
    full = {"params": 0, "macs": 0}
    comp = {"params": 0, "macs": 0}
    for name, layer in masks.layers.items():
        m = modules[name]
        per = m.weight[0].numel() // max(1, layer.in_channels // layer.groups) if isinstance(m, nn.Conv2d) else 1
        for out, q, p in ((full, layer.out_channels, layer.in_channels),
                          (comp, len(layer.keep_out), len(layer.keep_in))):
            w = q * (p // layer.groups) * per if layer.groups > 1 else q * p * per
            extra = q if m.bias is not None else 0
            following = names[names.index(name) + 1] if names.index(name) + 1 < len(names) else None
            if following and isinstance(modules[following], nn.BatchNorm2d | nn.BatchNorm1d):
                extra += 2 * q
            out["params"] += w + extra
            out["macs"] += w * spatial[name]
    return {"full": full, "component": comp}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vgg16_cifar10")
    ap.add_argument("--classes", default="0,1,2")
    ap.add_argument("--per-class", type=int, default=None, help="samples per class (default 50)")
    ap.add_argument("--fraction", type=float, default=None, help="share of each class's correct images instead")
    ap.add_argument("--pool", type=int, default=None, help="draw the samples from this many train images per class")
    ap.add_argument("--alpha-conv", type=float, default=None)
    ap.add_argument("--beta-conv", type=float, default=None)
    ap.add_argument("--alpha-linear", type=float, default=None)
    ap.add_argument("--beta-linear", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", default=None, help="conv alpha:beta pairs, e.g. 0.3:0.2,0.1:0.1; only mask_in is "
                    "evaluated for each (one contribution pass)")
    ap.add_argument("--per-layer", action="store_true", help="also mask one layer's inputs at a time")
    ap.add_argument("--json", default=None, help="append the result line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    if args.per_class is None and args.fraction is None:
        args.per_class = 50
    t0 = time.perf_counter()
    model = ra.create_model(args.model, pretrained=True).eval()
    mean, std = resolve_normalization(model, None, None)
    train = ra.load_dataset("cifar10", "train", max_per_class=args.pool)
    test = ra.load_dataset("cifar10", "test")
    chosen = select_samples(model, train, args.per_class, args.fraction, classes=classes)
    index, labels = chosen.flat()
    inputs = Preprocess(mean, std)(train.images[index])
    contrib = accumulate_contributions(model, inputs, labels, train.num_classes)
    alpha = {k: v for k, v in (("conv", args.alpha_conv), ("linear", args.alpha_linear)) if v is not None}
    beta = {k: v for k, v in (("conv", args.beta_conv), ("linear", args.beta_linear)) if v is not None}
    masks = locate_component(model, contrib, classes, input_size=tuple(test.image_size), alpha=alpha, beta=beta,
                             model_name=args.model)
    t_locate = time.perf_counter() - t0

    rows = torch.nonzero(torch.isin(test.labels, torch.tensor(classes)))[:, 0]
    x = Preprocess(mean, std)(test.images[rows])
    y = test.labels[rows]
    local = torch.tensor([classes.index(int(c)) for c in y])
    cls = torch.tensor(classes)

    def acc(logits, restricted=True):
        if restricted:
            return round(100 * (logits[:, cls].argmax(1) == local).double().mean().item(), 2)
        return round(100 * (logits.argmax(1) == y).double().mean().item(), 2)

    with torch.no_grad():
        full = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    result = {
        "model": args.model, "classes": classes, "per_class": [len(c) for c in chosen.indices if c],
        "pool": args.pool, "alpha": masks.alpha, "beta": masks.beta, "test_images": len(rows),
        "full_all_logits": acc(full, False), "full_restricted": acc(full),
        "mask_in": acc(masked_logits(model, masks, x, "in")),
        "kept_out": {n: f"{len(l.keep_out)}/{l.out_channels}" for n, l in masks.layers.items()},
        "size": component_size(model, masks, test.image_size),
        "seconds_locate": round(t_locate, 1), "seconds_total": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
    }
    result["mask_in_bn_recalibrated"] = acc(masked_logits(recalibrated(model, masks, inputs), masks, x, "in"))
    comp = compensations(model, masks, inputs)
    result["mask_in_mean_compensated_sequential"] = acc(masked_logits(
        model, masks, x, "in", bias=compensations_sequential(model, masks, inputs)))
    result["mask_in_mean_compensated"] = acc(masked_logits(model, masks, x, "in", bias=comp))
    if not args.sweep:
        result["mask_in_conv_only"] = acc(masked_logits(model, masks, x, "in", ("conv",)))
        result["mask_in_linear_only"] = acc(masked_logits(model, masks, x, "in", ("linear",)))
        result["mask_out_before_bn"] = acc(masked_logits(model, masks, x, "out"))
    else:
        result["sweep"] = []
        for pair in args.sweep.split(","):
            a, b = (float(v) for v in pair.split(":"))
            m = locate_component(model, contrib, classes, input_size=tuple(test.image_size),
                                 alpha={**alpha, "conv": a}, beta={**beta, "conv": b}, model_name=args.model)
            size = component_size(model, m, test.image_size)["component"]
            conv = [n for n, l in m.layers.items() if l.kind == "conv"]
            result["sweep"].append({"alpha_conv": a, "beta_conv": b, "mask_in": acc(masked_logits(model, m, x, "in")),
                                    "mask_in_bn_recalibrated": acc(masked_logits(
                                        recalibrated(model, m, inputs), m, x, "in")),
                                    "mask_in_mean_compensated_sequential": acc(masked_logits(
                                        model, m, x, "in", bias=compensations_sequential(model, m, inputs))),
                                    "mask_in_mean_compensated": acc(masked_logits(
                                        model, m, x, "in", bias=compensations(model, m, inputs))),
                                    "conv_channels_kept": sum(len(m.layers[n].keep_out) for n in conv),
                                    "params": size["params"], "macs": size["macs"]})
    if args.per_layer:
        result["mask_in_one_layer"] = {name: acc(masked_logits(model, masks, x, "in", only=name))
                                       for name in masks.layers}
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
