"""Diagnostic (training data only): held-out accuracy AND restricted cross-entropy of components, and restoration
ordered by what pruning each layer alone costs in cross-entropy, until the component's cross-entropy is no worse
than the original's (restoring every layer gives the head-only component, whose restricted logits equal the
original's, so the loop always ends).

    python loss.py MODEL grid            # every grid point: accuracy, cross-entropy, params
    python loss.py MODEL '[ca,cb,la,lb]'  # that point, then cross-entropy-ordered restoration
"""
import sys, json, copy, itertools
import os; sys.path.insert(0, os.path.abspath(__file__).rsplit("/results/", 1)[0] + "/benchmarks")
import torch
import torch.nn.functional as F
import reassembly as ra
from reassembly.data import Preprocess
from reassembly.lego import accumulate_contributions, select_samples
from reassembly.lego import locate as L
from reassembly.lego.calibrate import GRID, held_out_indices, mask_cost, masked_logits, _accuracy
from reassembly.lego.report import logits_in_batches
from reassembly.train.evaluate import resolve_normalization
from lego_components import MODELS, pool_indices
torch.set_num_threads(1)
classes = [0, 1, 2]
train = ra.load_dataset("cifar10", "train")
pool_index = pool_indices(train, 300)
name = sys.argv[1]
model = ra.create_model(name, **MODELS[name]).eval()
mean, std = resolve_normalization(model, None, None)
pool = train.subset(pool_index)
chosen = select_samples(model, pool, 50, classes=classes)
index, labels = chosen.flat()
contrib = accumulate_contributions(model, Preprocess(mean, std)(pool.images[index]), labels, pool.num_classes)
held = train.subset(held_out_indices(train, classes, pool_index, 5000, seed=0))
inputs = Preprocess(mean, std)(held.images)
local = torch.tensor([classes.index(int(c)) for c in held.labels])
full = logits_in_batches(model, inputs)[:, classes]
nll0 = F.cross_entropy(full, local).item()
print(name, "original", _accuracy(full, local), f"ce {nll0:.5f}", "errors", int((full.argmax(1) != local).sum()),
      flush=True)


def score(masks):
    got = masked_logits(model, masks, inputs)
    agree = (got.argmax(1) == full.argmax(1)).double().mean().item()
    return _accuracy(got, local), F.cross_entropy(got, local).item(), round(100 * agree, 2)


def locate(ca, cb, la, lb, whole=()):
    return L.locate_component(model, contrib, classes, alpha={"conv": ca, "linear": la},
                              beta={"conv": cb, "linear": lb}, model_name=name, keep_whole=list(whole))


if sys.argv[2] == "grid":
    for (ca, cb), (la, lb) in itertools.product(GRID["conv"], GRID["linear"]):
        m = locate(ca, cb, la, lb)
        acc, ce, agree = score(m)
        print(f"conv {ca}/{cb} linear {la}/{lb}: acc {acc} ce {ce:.5f} ({ce - nll0:+.5f}) agree {agree} "
              f"params {mask_cost(model, m)[0]}", flush=True)
    sys.exit()
ca, cb, la, lb = json.loads(sys.argv[2])
best = locate(ca, cb, la, lb)
acc, ce, agree = score(best)
print(f"point: acc {acc} ce {ce:.5f} ({ce - nll0:+.5f}) params {mask_cost(model, best)[0]}", flush=True)
costs = {}
for layer, lm in best.layers.items():
    if len(lm.keep_in) == lm.in_channels:
        continue
    one = copy.copy(best); one.layers = {layer: lm}
    a, c, _ = score(one)
    costs[layer] = c - nll0
    print(f"only {layer}: keeps {len(lm.keep_in)}/{lm.in_channels} -> acc {a} ce cost {c - nll0:+.5f}", flush=True)
order = sorted(costs, key=lambda n: -costs[n])
for k in range(1, len(order) + 1):
    m = locate(ca, cb, la, lb, order[:k])
    acc, ce, agree = score(m)
    print(f"restore {order[:k][-1]} ({k}): acc {acc} ce {ce:.5f} ({ce - nll0:+.5f}) agree {agree} "
          f"params {mask_cost(model, m)[0]}", flush=True)
    if ce <= nll0:
        break
