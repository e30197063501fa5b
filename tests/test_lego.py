"""Model LEGO / MDA: sample selection, relative contributions and component locating on tiny models."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reassembly.data import ImageDataset
from reassembly.errors import ReassemblyError
from reassembly.lego import accumulate_contributions, select_samples
from reassembly.lego.contribution import Contributions, conv_contribution
from reassembly.lego.locate import ComponentMasks, locate_component
from reassembly.zoo.models.cifar_resnet import CifarResNet

NUM_CLASSES = 5


class Mixed(nn.Module):
    """Plain conv (stride, padding), grouped conv, depthwise conv, concat, flatten of a 2x2 map, two linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, 2, 1, groups=8)
        self.side = nn.Conv2d(8, 4, 1, 2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(12 * 4, 16)
        self.fc2 = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.grouped(x)) + x
        x = torch.cat([F.relu(self.depthwise(x)), self.side(x)], dim=1)
        return self.fc2(F.relu(self.fc1(torch.flatten(self.pool(x), 1))))


class TinyMobile(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, project 1x1, added to the block input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 1, 1)
        self.expand = nn.Conv2d(6, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, 1, 1, groups=12)
        self.project = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        y = self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))
        return self.head((x + y).mean((2, 3)))


def _data(n=20, size=8):
    return torch.randn(n, 3, size, size), torch.arange(n) % NUM_CLASSES


def _naive(model, x, labels):
    """Per-class sums of positive per-sample contributions, one (q, p) pair at a time with F.conv2d."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    result = {}
    for name, m in model.named_modules():
        if name not in inputs:
            continue
        a, p_group = inputs[name], m.weight.shape[1]
        total = torch.zeros(NUM_CLASSES, m.weight.shape[0], p_group, dtype=torch.float64)
        for q in range(m.weight.shape[0]):
            for pl in range(p_group):
                if isinstance(m, nn.Conv2d):
                    p = q // (m.out_channels // m.groups) * p_group + pl
                    part = F.conv2d(a[:, p:p + 1], m.weight[q:q + 1, pl:pl + 1], None, m.stride, m.padding,
                                    m.dilation).sum((1, 2, 3)).detach()
                else:
                    part = (m.weight[q, pl] * a[:, pl]).detach()
                for b in range(len(labels)):
                    total[labels[b], q, pl] += max(0.0, float(part[b]))
        result[name] = total
    return result


def test_vectorised_contribution_equals_naive_loop():
    model = Mixed()
    x, labels = _data()
    fast = accumulate_contributions(model, x, labels, NUM_CLASSES, batch_size=7)
    slow = _naive(model, x, labels)
    assert list(fast.layers) == ["stem", "grouped", "depthwise", "side", "fc1", "fc2"]
    for name, expected in slow.items():
        got = fast.layers[name].total
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert fast.samples.tolist() == [4] * NUM_CLASSES


def test_conv_contributions_add_up_to_the_output():
    conv = nn.Conv2d(4, 6, 3, 2, 1, groups=2)
    x = torch.randn(3, 4, 9, 9)
    out = conv(x)
    recomposed = conv_contribution(x, conv).sum(-1) + conv.bias * out.shape[2] * out.shape[3]
    torch.testing.assert_close(recomposed, out.sum((2, 3)), rtol=1e-4, atol=1e-4)


def _located(model, classes=(0, 2), size=8, **kw):
    x, labels = _data(size=size)
    contributions = accumulate_contributions(model, x, labels, NUM_CLASSES)
    return locate_component(model, contributions, classes, input_size=(3, size, size), **kw)


def test_residual_add_keeps_the_same_channels_on_both_sides():
    model = CifarResNet(8, NUM_CLASSES, width=4)  # stages 4/8/16 channels, option-A padding into stages 2 and 3
    masks = _located(model, size=16, beta={"conv": 0.5, "linear": 0.5})
    layers = masks.layers
    stream1 = layers["conv1"].keep_out
    assert layers["layer1.0.conv1"].keep_in == stream1
    assert layers["layer1.0.conv2"].keep_out == stream1  # the add couples the block output with its input
    for stage, previous in (("layer2", "layer1"), ("layer3", "layer2")):
        out = layers[f"{stage}.0.conv2"].keep_out
        into = layers[f"{stage}.0.conv1"].keep_in
        width = layers[f"{stage}.0.conv1"].in_channels
        low = (layers[f"{stage}.0.conv2"].out_channels - width) // 2
        assert into == layers[f"{previous}.0.conv2"].keep_out
        # the padded shortcut adds input channel i to output channel low + i: both kept or both dropped
        assert [k - low for k in out if low <= k < low + width] == into
    assert layers["linear"].keep_in == layers["layer3.0.conv2"].keep_out
    assert any(len(m.keep_out) < m.out_channels for m in layers.values())  # something was actually removed


def test_depthwise_conv_keeps_input_equal_to_output_and_add_is_consistent():
    masks = _located(TinyMobile(), classes=[1, 3, 4], beta={"conv": 0.5, "linear": 0.5})
    dw = masks.layers["dw"]
    assert 0 < len(dw.keep_out) < dw.out_channels and 0 < len(masks.layers["stem"].keep_out) < 6
    assert dw.keep_in == dw.keep_out == masks.layers["expand"].keep_out
    assert masks.layers["project"].keep_out == masks.layers["stem"].keep_out == masks.layers["expand"].keep_in
    assert masks.layers["head"].keep_in == masks.layers["stem"].keep_out


def test_concat_grouped_and_flatten_are_mapped_to_channels():
    masks = _located(Mixed(), classes=[4], beta={"conv": 0.5, "linear": 0.5})
    layers = masks.layers
    assert all(0 < len(layers[n].keep_out) < layers[n].out_channels for n in ("stem", "depthwise", "side", "fc1"))
    fc1 = layers["fc1"].keep_in  # 12 channels x 4 positions
    channels = sorted({f // 4 for f in fc1})
    assert fc1 == [4 * c + i for c in channels for i in range(4)]  # whole channels only
    assert layers["depthwise"].keep_out == [c for c in channels if c < 8]
    assert layers["side"].keep_out == [c - 8 for c in channels if c >= 8]
    assert layers["depthwise"].keep_in == layers["depthwise"].keep_out
    grouped = layers["grouped"]  # a group's inputs and outputs are kept whole
    for group in (range(0, 4), range(4, 8)):
        kept = [c in grouped.keep_out for c in group] + [c in grouped.keep_in for c in group]
        assert all(kept) or not any(kept)
    assert layers["stem"].keep_in == [0, 1, 2]


@pytest.mark.parametrize("classes", [[0, 2], [3], [4, 1, 0]])
def test_head_keeps_exactly_the_chosen_classes(classes):
    masks = _located(Mixed(), classes=classes)
    assert masks.layers["fc2"].keep_out == classes
    assert masks.classes == classes
    for name, layer in masks.layers.items():
        assert set(layer.relevant_in) == {str(c) for c in classes}
        assert layer.keep_in and layer.keep_out, name


@pytest.mark.parametrize("classes, message", [
    ([5], "class 5 is out of range"),
    ([-1], "class -1 is out of range"),
    ([], "class list is empty"),
    ([1, 1], "names a class twice"),
    (["a"], "not an integer"),
])
def test_bad_classes_raise_a_reassembly_error(classes, message):
    with pytest.raises(ReassemblyError, match=message):
        _located(Mixed(), classes=classes)


def test_class_without_samples_is_an_error():
    model = Mixed()
    x, labels = _data()
    contributions = accumulate_contributions(model, x[labels != 3], labels[labels != 3], NUM_CLASSES)
    with pytest.raises(ReassemblyError, match="class 3 has no samples"):
        locate_component(model, contributions, [3], input_size=(3, 8, 8))


def test_unknown_operation_is_named():
    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, NUM_CLASSES)

        def forward(self, x):
            return self.fc(torch.roll(self.conv(x), 1, 1).mean((2, 3)))

    with pytest.raises(ReassemblyError, match="roll"):
        _located(Shuffled())


def test_records_round_trip(tmp_path):
    model = Mixed()
    x, labels = _data()
    contributions = accumulate_contributions(model, x, labels, NUM_CLASSES)
    contributions.save(tmp_path / "c.safetensors")
    again = Contributions.load(tmp_path / "c.safetensors")
    assert list(again.layers) == list(contributions.layers)
    torch.testing.assert_close(again.layers["fc1"].total, contributions.layers["fc1"].total)
    masks = locate_component(model, again, [0, 2], input_size=(3, 8, 8))
    masks.save(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "reassembly.lego.masks/1"
    assert ComponentMasks.load(tmp_path / "m.json") == masks


def test_select_samples_takes_the_most_confident_correct_images():
    class Fixed(nn.Module):  # logits read straight from the mean of the first channels
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x[:, 0, 0, :NUM_CLASSES] * self.scale

    images = torch.randint(0, 256, (200, 1, 1, NUM_CLASSES), dtype=torch.uint8)
    labels = torch.arange(200) % NUM_CLASSES
    data = ImageDataset(images, labels, tuple("abcde"), "synthetic")
    chosen = select_samples(Fixed(), data, per_class=3, mean=(0.0,), std=(1.0,), batch_size=16)
    logits = images[:, 0, 0].float() / 255
    prob = logits.softmax(1)[torch.arange(200), labels]
    correct = logits.argmax(1) == labels
    for c in range(NUM_CLASSES):
        pool = [(float(prob[i]), i) for i in range(200) if labels[i] == c and correct[i]]
        expected = [i for _, i in sorted(pool, reverse=True)[:3]]
        assert chosen.indices[c] == expected and len(expected) == 3
    with pytest.raises(ReassemblyError, match="exactly one of per_class"):
        select_samples(Fixed(), data, per_class=3, fraction=0.1, mean=(0.0,), std=(1.0,))
    part = select_samples(Fixed(), data, per_class=3, mean=(0.0,), std=(1.0,), classes=[3, 1])
    assert part.indices[1] == chosen.indices[1] and part.indices[3] == chosen.indices[3]
    assert part.indices[0] == part.indices[2] == part.indices[4] == []
    with pytest.raises(ReassemblyError, match="non-empty list"):
        select_samples(Fixed(), data, per_class=3, mean=(0.0,), std=(1.0,), classes=[7])


class Chain(nn.Module):
    """A plain VGG-like chain ending in a 1x1 map: the case where the official reversed module list is exact."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, 1, 1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _official_chain_masks(model, contributions, alpha, beta):
    """The spec's section 4.1 recursion, written out as stated: reversed layer list, identity start, min-max
    normalisation (eps 1e-5) of rows and of counts, strict thresholds chosen by the masked layer's kind."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][::-1]
    mask = torch.eye(NUM_CLASSES, dtype=torch.float64)
    result = {}
    for name in names:
        layer = contributions.layers[name]
        a = layer.total
        r = (a - a.min(-1, keepdim=True).values) / (a.max(-1, keepdim=True).values - a.min(-1, keepdim=True).values
                                                     + 1e-5)
        count = torch.einsum("co,coi->ci", mask, (r > alpha[layer.kind]).double())
        n = (count - count.min(-1, keepdim=True).values) / (count.max(-1, keepdim=True).values
                                                            - count.min(-1, keepdim=True).values + 1e-5)
        mask = (n > beta[layer.kind]).double()
        result[name] = mask
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_chain_masks_equal_the_official_recursion(seed):
    """On a chain the graph-aware locating must give each class exactly the official per-class masks (the same
    check on vgg16_cifar10 against the official code itself: benchmarks/lego_official_xcheck.py)."""
    torch.manual_seed(seed)
    model = Chain().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial BN statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    x, labels = torch.randn(40, 3, 8, 8), torch.arange(40) % NUM_CLASSES
    contributions = accumulate_contributions(model, x, labels, NUM_CLASSES)
    from reassembly.lego import ALPHA, BETA

    expected = _official_chain_masks(model, contributions, ALPHA, BETA)
    classes = [0, 1, 2, 3, 4]
    masks = locate_component(model, contributions, classes, input_size=(3, 8, 8))
    for name, layer in masks.layers.items():
        for c in classes:
            want = torch.nonzero(expected[name][c])[:, 0].tolist()
            if not want and name != "features.0":  # all-equal rows: the deliberate keep-all departure
                continue
            assert layer.relevant_in[str(c)] == want, (name, c)


# ---------------------------------------------------------------------------------------------- extraction (step 4)
class TinyMobileBN(nn.Module):
    """MobileNetV2-like: BN'd stem, two inverted residuals (expand, depthwise, project), the second with a shortcut."""

    def __init__(self):
        super().__init__()

        def cba(i, o, k=1, s=1, g=1, act=True):
            return [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)] + (
                [nn.ReLU6()] if act else [])
        self.stem = nn.Sequential(*cba(3, 8, 3))
        self.block1 = nn.Sequential(*cba(8, 24), *cba(24, 24, 3, 2, 24), *cba(24, 12, act=False))
        self.block2 = nn.Sequential(*cba(12, 36), *cba(36, 36, 3, 1, 36), *cba(36, 12, act=False))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(12, NUM_CLASSES))

    def forward(self, x):
        x = self.block1(self.stem(x))
        return self.head(x + self.block2(x))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _masked_logits(model, masks, x):
    """The full model with every dropped input channel of each conv/linear layer zeroed (pruning, for a component
    whose coupled channels agree)."""
    modules = dict(model.named_modules())
    handles = []
    for name, layer in masks.layers.items():
        keep = torch.zeros(layer.in_channels)
        keep[layer.keep_in] = 1
        shape = (1, -1, 1, 1) if isinstance(modules[name], nn.Conv2d) else (1, -1)
        handles.append(modules[name].register_forward_pre_hook(
            lambda m, args, keep=keep, shape=shape: (args[0] * keep.view(shape),)))
    try:
        with torch.no_grad():
            return model(x)[:, masks.classes]
    finally:
        for h in handles:
            h.remove()


EXTRACT_CASES = {
    "chain": (lambda: Chain(), 8, [3, 0]),
    "resnet": (lambda: CifarResNet(8, NUM_CLASSES, width=4), 16, [0, 2, 4]),
    "mobile": (lambda: TinyMobileBN(), 8, [4, 1]),
}


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extracted_component_equals_the_masked_model(case, tmp_path):
    pytest.importorskip("torch_pruning")
    from reassembly.lego.extract import count_params_macs, extract_component

    build, size, classes = EXTRACT_CASES[case]
    torch.manual_seed(0)
    model = _randomise_bn(build())
    model.reassembly_name = {"chain": None, "resnet": "cifar_resnet8", "mobile": None}[case]
    masks = _located(model, classes=classes, size=size, beta={"conv": 0.5, "linear": 0.5})
    assert any(len(l.keep_out) < l.out_channels for n, l in masks.layers.items() if l.kind == "conv")
    before = [p.clone() for p in model.state_dict().values()]
    component = extract_component(model, masks, torch.randn(1, 3, size, size))
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))  # original untouched
    x = torch.randn(16, 3, size, size)
    with torch.no_grad():
        got = component(x)
    torch.testing.assert_close(got, _masked_logits(model, masks, x), rtol=1e-4, atol=1e-5)
    assert got.shape == (16, len(classes))
    params, macs = count_params_macs(model, (3, size, size))
    small_params, small_macs = count_params_macs(component, (3, size, size))
    assert small_params < params and small_macs < macs
    assert not any(isinstance(m, type(model)) and m is model for m in component.modules())
    if case == "resnet":
        from reassembly.lego.extract import ChannelEmbed

        assert sum(isinstance(m, ChannelEmbed) for m in component.modules()) == 2


def test_component_save_load_round_trip(tmp_path):
    pytest.importorskip("torch_pruning")
    import reassembly as ra
    from reassembly.lego.extract import extract_component, load_component, save_component

    torch.manual_seed(1)
    model = _randomise_bn(ra.create_model("cifar_resnet20", num_classes=NUM_CLASSES, width=4))
    masks = _located(model, classes=[4, 1], size=16, beta={"conv": 0.5, "linear": 0.5})
    component = extract_component(model, masks, architecture="cifar_resnet20",
                                  arch_kwargs={"num_classes": NUM_CLASSES, "width": 4})
    save_component(component, tmp_path / "comp")
    assert not list((tmp_path / "comp").glob("*.pt*"))
    meta = json.loads((tmp_path / "comp" / "component.json").read_text())
    assert meta["classes"] == [4, 1] and meta["architecture"] == "cifar_resnet20"
    again = load_component(tmp_path / "comp")
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), component(x), rtol=0, atol=0)
    assert again.input_normalization == component.input_normalization


def test_extraction_refuses_what_it_cannot_follow():
    pytest.importorskip("torch_pruning")
    from reassembly.lego.extract import extract_component

    model = Chain().eval()
    masks = _located(model, classes=[0], size=8)
    masks.layers.pop("features.4")
    with pytest.raises(ReassemblyError, match="features.4"):
        extract_component(model, masks)


@pytest.mark.parametrize("classes", [[4, 1], [0], [2, 3]])
def test_concat_is_extracted_exactly_or_refused_by_name(classes):
    """Torch-Pruning 1.6 mis-maps some channel concatenations (a root on the second input maps to the first's
    channels). Extraction must then refuse, naming a layer, never return a model that differs from the masking."""
    pytest.importorskip("torch_pruning")
    from reassembly.lego.extract import extract_component

    torch.manual_seed(0)
    model = Mixed().eval()
    masks = _located(model, classes=classes, beta={"conv": 0.5, "linear": 0.5})
    try:
        component = extract_component(model, masks)
    except ReassemblyError as error:
        assert any(name in str(error) for name in masks.layers)
        return
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(component(x), _masked_logits(model, masks, x), rtol=1e-4, atol=1e-5)


def test_reassembly_eval_loads_a_saved_component(tmp_path):
    pytest.importorskip("torch_pruning")
    import subprocess
    import sys

    import reassembly as ra
    from reassembly.lego.extract import extract_component, save_component

    from .conftest import CIFAR_ZIP

    torch.manual_seed(2)
    model = _randomise_bn(ra.create_model("cifar_resnet20", width=4))  # 10 classes
    x, labels = torch.randn(30, 3, 16, 16), torch.arange(30) % 10
    masks = locate_component(model, accumulate_contributions(model, x, labels, 10), [2, 0], input_size=(3, 32, 32))
    save_component(extract_component(model, masks, architecture="cifar_resnet20",
                                     arch_kwargs={"num_classes": 10, "width": 4}), tmp_path / "comp")

    def run(data):
        return subprocess.run([sys.executable, "-m", "reassembly", "eval", "--model", str(tmp_path / "comp"),
                               "--data", data, "--limit", "20"], check=False, capture_output=True, text=True,
                              timeout=300)

    wrong = run("cifar10")
    assert wrong.returncode != 0 and "cifar10[2,0]" in wrong.stderr and "Traceback" not in wrong.stderr
    if CIFAR_ZIP.is_file():
        ok = run("cifar10[2,0]")
        assert ok.returncode == 0, ok.stderr
        assert "20 images" in ok.stdout


def test_hand_written_channel_padding_is_refused_by_name():
    pytest.importorskip("torch_pruning")
    from reassembly.lego.extract import extract_component

    class MyPad(nn.Module):  # an option-A shortcut the zoo does not know
        def forward(self, x):
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))

    torch.manual_seed(0)
    model = _randomise_bn(CifarResNet(8, NUM_CLASSES, width=4))
    model.layer2[0].shortcut = MyPad()
    masks = _located(model, classes=[0, 2], size=16, beta={"conv": 0.5, "linear": 0.5})
    with pytest.raises(ReassemblyError, match=r"channel padding in layer2\.0\.shortcut"):
        extract_component(model, masks)
