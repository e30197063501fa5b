"""Exploration (training data only): MDA's count normalisation as in the 2022 code (divide by the max, min taken as 0),
so beta 0 keeps every input counted at least once. Held-out = every training image of the classes outside the pool.
Optional arguments 3 and 4: contribution samples per class (50) and the pool they are drawn from per class (300)."""
import sys, time, json
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

NORM = {"mode": "minmax"}
orig = L.relevant_inputs
def relevant_inputs(contribution, rows, out_mask, alpha, beta):
    if NORM["mode"] == "minmax":
        return orig(contribution, rows, out_mask, alpha, beta)
    n, q = out_mask.shape
    g = contribution.groups
    pg = contribution.total.shape[-1]
    if g > 1 and pg == 1:
        return out_mask.reshape(n, g, q // g).any(-1)
    major = (contribution.normalised(rows, L.EPS) > alpha).double().reshape(n, g, q // g, pg)
    counts = torch.einsum("ngq,ngqp->ngp", out_mask.double().reshape(n, g, q // g), major).reshape(n, g * pg)
    high = counts.amax(1, keepdim=True)
    return counts / (high + L.EPS) > beta
L.relevant_inputs = relevant_inputs

torch.set_num_threads(1)
classes = [0, 1, 2]
train = ra.load_dataset("cifar10", "train")
pool_index = pool_indices(train, int(sys.argv[4]) if len(sys.argv) > 4 else 300)
name = sys.argv[1]
points = json.loads(sys.argv[2])  # [[mode, ca, cb, la, lb], ...]
model = ra.create_model(name, **MODELS[name]).eval()
mean, std = resolve_normalization(model, None, None)
pool = train.subset(pool_index)
chosen = select_samples(model, pool, int(sys.argv[3]) if len(sys.argv) > 3 else 50, classes=classes)
index, labels = chosen.flat()
contrib = accumulate_contributions(model, Preprocess(mean, std)(pool.images[index]), labels, pool.num_classes)
rest = held_out_indices(train, classes, pool_index, 5000, seed=0)
held = train.subset(rest)
inputs = Preprocess(mean, std)(held.images)
local = torch.tensor([classes.index(int(c)) for c in held.labels])
full = logits_in_batches(model, inputs)
print(name, "held-out", len(local), "original", _accuracy(full[:, classes], local), flush=True)
P0, M0 = mask_cost(model, L.locate_component(model, contrib, classes, alpha={"conv": 0, "linear": 0}, beta={"conv": -1, "linear": -1}, model_name=name))
for mode, ca, cb, la, lb in points:
    NORM["mode"] = mode
    t = time.time()
    masks = L.locate_component(model, contrib, classes, alpha={"conv": ca, "linear": la}, beta={"conv": cb, "linear": lb}, model_name=name)
    p, m = mask_cost(model, masks)
    acc = _accuracy(masked_logits(model, masks, inputs), local)
    print(f"{mode} conv {ca}/{cb} linear {la}/{lb}: params {p} ({100*p/P0:.1f}%) macs {m/1e6:.1f}M ({100*m/M0:.1f}%) held-out {acc} [{time.time()-t:.0f}s]", flush=True)
