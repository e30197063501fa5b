"""Diagnostic (training data only): held-out accuracy with one layer's mask applied at a time, and with all but one."""
import sys, time, json, copy
import os; sys.path.insert(0, os.path.abspath(__file__).rsplit("/results/", 1)[0] + "/benchmarks")
import torch
import reassembly as ra
from reassembly.data import Preprocess
from reassembly.lego import accumulate_contributions, select_samples
from reassembly.lego import locate as L
from reassembly.lego.calibrate import held_out_indices, mask_cost, masked_logits, _accuracy
from reassembly.lego.report import logits_in_batches
from reassembly.train.evaluate import resolve_normalization
from lego_components import MODELS, pool_indices
torch.set_num_threads(1)
classes = [0, 1, 2]
train = ra.load_dataset("cifar10", "train")
pool_index = pool_indices(train, 300)
name = sys.argv[1]
ca, cb, la, lb = json.loads(sys.argv[2])
model = ra.create_model(name, **MODELS[name]).eval()
mean, std = resolve_normalization(model, None, None)
pool = train.subset(pool_index)
chosen = select_samples(model, pool, 50, classes=classes)
index, labels = chosen.flat()
contrib = accumulate_contributions(model, Preprocess(mean, std)(pool.images[index]), labels, pool.num_classes)
rest = held_out_indices(train, classes, pool_index, 5000, seed=0)
held = train.subset(rest)
inputs = Preprocess(mean, std)(held.images)
local = torch.tensor([classes.index(int(c)) for c in held.labels])
full = logits_in_batches(model, inputs)[:, classes]
print(name, "original", _accuracy(full, local), "errors", int((full.argmax(1) != local).sum()), flush=True)
masks = L.locate_component(model, contrib, classes, alpha={"conv": ca, "linear": la}, beta={"conv": cb, "linear": lb}, model_name=name)
got = masked_logits(model, masks, inputs)
print("all layers", _accuracy(got, local), flush=True)
for layer, lm in masks.layers.items():
    if len(lm.keep_in) == lm.in_channels:
        continue
    one = copy.copy(masks); one.layers = {layer: lm}
    acc = _accuracy(masked_logits(model, one, inputs), local)
    print(f"only {layer}: keeps {len(lm.keep_in)}/{lm.in_channels} inputs -> {acc}", flush=True)
