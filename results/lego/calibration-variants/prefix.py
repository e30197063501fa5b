"""Diagnostic (training data only): restore the k shallowest pruned layers of a grid point, k = 0, 1, ..., until the
held-out target is met."""
import sys, time, json, copy
exec(open(__file__.replace("prefix.py", "perlayer.py")).read().split('print("all layers"')[0])
import dataclasses
target = _accuracy(full, local)
pruned = [n for n, lm in masks.layers.items() if len(lm.keep_in) < lm.in_channels or len(lm.keep_out) < lm.out_channels]
print("pruned layers", pruned, flush=True)
order = list(masks.layers)
for k in range(0, len(pruned) + 1):
    m = copy.copy(masks)
    layers = dict(masks.layers)
    for n in pruned[:k]:
        lm = layers[n]
        layers[n] = dataclasses.replace(lm, keep_in=list(range(lm.in_channels)))
    m.layers = layers
    acc = _accuracy(masked_logits(model, m, inputs), local)
    print(f"restore inputs of {pruned[:k]}: held-out {acc} (target {target})", flush=True)
    if acc >= target:
        break
