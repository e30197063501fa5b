# ruff: noqa: I001  (the official modules need their stubs in sys.modules before they are imported)
"""Cross-check of reassembly.lego's masks against the official MDA code, imported unchanged (not copied).

Runs the official ``RelevantFeatureIdentifying`` (``core/relevant_feature_identifying.py`` of jiaconghu/Model-LEGO,
studied at 8ffb7c0) and ``reassembly.lego`` on vgg16_cifar10 with the same 150 samples (classes 0, 1, 2, 50 each,
the most confident of 300 training images per class), and compares, layer by layer, the summed contributions and
each class's relevant-input mask. VGG is a plain chain, so the official reversed module list is its true order.

    PYTHONPATH=src python benchmarks/lego_official_xcheck.py /path/to/Model-LEGO   # a checkout of the official repo
"""
import importlib.util, sys, types, os, tempfile, torch
sys.modules['models'] = types.ModuleType('models'); sys.modules['loaders'] = types.ModuleType('loaders')
if importlib.util.find_spec('tqdm') is None:
    m = types.ModuleType('tqdm'); m.tqdm = lambda x, **k: x; sys.modules['tqdm'] = m
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else '/tmp/lego2/official')
from core.relevant_feature_identifying import RelevantFeatureIdentifying
import reassembly as ra
from reassembly.data import Preprocess
from reassembly.lego import accumulate_contributions, select_samples
from reassembly.lego.locate import locate_component
from reassembly.train.evaluate import resolve_normalization
torch.set_num_threads(1)
model = ra.create_model('vgg16_cifar10', pretrained=True).eval()
mean, std = resolve_normalization(model, None, None)
train = ra.load_dataset('cifar10', 'train', max_per_class=300)
chosen = select_samples(model, train, 50, classes=[0, 1, 2])
index, labels = chosen.flat()
x = Preprocess(mean, std)(train.images[index])
names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][::-1]
mods = dict(model.named_modules())
save = tempfile.mkdtemp(); os.makedirs(save + '/masks')
rfi = RelevantFeatureIdentifying([mods[n] for n in names], 10, save)
with torch.no_grad():
    for i in range(0, len(x), 10):
        out = model(x[i:i + 10]); rfi(out, labels[i:i + 10])
import numpy as np
for layer in rfi.values:  # classes 3..9 have no samples: give them zero arrays so the official stacking works
    for c in range(3, 10):
        layer[c] = np.zeros_like(layer[0])
rfi.identify()
contrib = accumulate_contributions(model, x, labels, 10)
masks = locate_component(model, contrib, [0, 1, 2])
for i, n in enumerate(names):
    off = torch.load(f'{save}/masks/mask_layer{i}.pt', weights_only=True)
    ours = masks.layers[n].relevant_in
    same = all(sorted(torch.nonzero(off[c])[:, 0].tolist()) == ours[str(c)] for c in (0, 1, 2))
    a_off = torch.from_numpy(__import__('numpy').asarray(rfi.values[i]))[:3]
    diff = (a_off.double() - contrib.layers[n].total[:3]).abs().max().item() / contrib.layers[n].total[:3].abs().max().item()
    print(n, 'masks equal' if same else 'MASKS DIFFER', [int(off[c].sum()) for c in (0, 1, 2)],
          [len(ours[str(c)]) for c in (0, 1, 2)], f'A rel diff {diff:.1e}')
