"""Model LEGO / MDA, the second half: threshold calibration, assembly (parallel and block-diagonal), parameter
scaling, saving/loading assemblies, the decision-route picture and the compression report, on tiny models."""

import json

import pytest
import torch
from torch import nn

import reassembly as ra
from reassembly.data import ImageDataset
from reassembly.errors import ReassemblyError
from reassembly.lego import accumulate_contributions, locate_component

pytest.importorskip("torch_pruning")

from reassembly.lego import (  # after the skip: needs Torch-Pruning
    assemble,
    calibrate_thresholds,
    compression_report,
    draw_routes,
    extract_component,
    load_assembly,
    mask_cost,
    masked_logits,
    merge_block_diagonal,
    save_assembly,
    scale_head,
)

from .test_lego import TinyMobileBN, _randomise_bn

SIZE = 32
ARCHS = {  # small zoo architectures (registered, so that saved assemblies rebuild)
    "resnet": ("cifar_resnet20", {"width": 4}),
    "vgg": ("cifar_vgg11_bn", {"width": 0.125, "hidden": (16,)}),
}


def _component(arch, classes, seed=0, beta=0.3, dataset="cifar10"):
    torch.manual_seed(seed)
    name, kwargs = ARCHS[arch]
    model = _randomise_bn(ra.create_model(name, **kwargs))
    x, labels = torch.randn(40, 3, SIZE, SIZE), torch.arange(40) % 10
    masks = locate_component(model, accumulate_contributions(model, x, labels, 10), classes,
                             input_size=(3, SIZE, SIZE), beta={"conv": beta, "linear": beta})
    return extract_component(model, masks, dataset=dataset)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_parallel_assembly_concatenates_logits_in_class_order_with_no_extra_parameters():
    a, b = _component("resnet", [4, 0]), _component("vgg", [7, 2, 9])
    assembly = assemble([a, b])
    x = torch.randn(6, 3, SIZE, SIZE)
    got = _logits(assembly, x)
    want = torch.cat([_logits(a, x), _logits(b, x)], 1)  # classes 4, 0, 7, 2, 9
    assert assembly.reassembly_classes == [0, 2, 4, 7, 9]
    torch.testing.assert_close(got, want[:, [1, 3, 0, 2, 4]], rtol=0, atol=0)
    assert sum(p.numel() for p in assembly.parameters()) == sum(p.numel() for m in (a, b) for p in m.parameters())
    assert got.shape == (6, 5)


def test_branches_apply_their_own_normalisation():
    a, b = _component("resnet", [0, 1]), _component("vgg", [2, 3])
    ra.data.set_normalization(b, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7))
    assembly = assemble([a, b])
    assert assembly.input_normalization == {"mean": [0.0] * 3, "std": [1.0] * 3}  # it reads [0, 1] pixels
    pixels = torch.rand(5, 3, SIZE, SIZE)

    def own(model):
        norm = model.input_normalization
        mean, std = torch.tensor(norm["mean"]).view(1, -1, 1, 1), torch.tensor(norm["std"]).view(1, -1, 1, 1)
        return _logits(model, (pixels - mean) / std)

    torch.testing.assert_close(_logits(assembly, pixels), torch.cat([own(a), own(b)], 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet", "vgg", "mobile"])
def test_block_diagonal_merge_equals_the_parallel_assembly(arch):
    if arch == "mobile":  # depthwise convs: their groups add up
        parts = []
        for seed, classes in ((0, [1, 3]), (1, [0, 4])):
            torch.manual_seed(seed)
            model = _randomise_bn(TinyMobileBN())
            x, labels = torch.randn(20, 3, 8, 8), torch.arange(20) % 5
            masks = locate_component(model, accumulate_contributions(model, x, labels, 5), classes,
                                     input_size=(3, 8, 8), beta={"conv": 0.5, "linear": 0.5})
            parts.append(extract_component(model, masks))
        x = torch.randn(4, 3, 8, 8)
    else:
        parts = [_component(arch, [0, 5], seed=0), _component(arch, [3, 1, 8], seed=1)]
        x = torch.randn(4, 3, SIZE, SIZE)
    merged = merge_block_diagonal(parts)
    torch.testing.assert_close(_logits(merged, x), torch.cat([_logits(p, x) for p in parts], 1), rtol=0, atol=1e-5)
    widths = [[m.out_channels for m in p.modules() if isinstance(m, nn.Conv2d)] for p in parts]
    assert [m.out_channels for m in merged.modules() if isinstance(m, nn.Conv2d)] == [sum(w) for w in zip(*widths)]
    convs = [[m for m in p.modules() if isinstance(m, nn.Conv2d)] for p in (merged, *parts)]
    grouped = [(m, rest) for m, *rest in zip(*convs) if m.groups > 1]
    assert bool(grouped) == (arch == "mobile")
    assert all(m.groups == sum(r.groups for r in rest) == m.in_channels for m, rest in grouped)  # depthwise
    assembled = assemble(parts, "block-diagonal")
    parallel = assemble(parts)
    torch.testing.assert_close(_logits(assembled, x), _logits(parallel, x), rtol=0, atol=1e-5)
    # the zero blocks count: the merge is bigger than the parts, the parallel assembly is not
    assert sum(p.numel() for p in assembled.parameters()) > sum(p.numel() for p in parallel.parameters())


def test_block_diagonal_refuses_different_architectures_and_normalisations():
    a, b = _component("resnet", [0, 4]), _component("vgg", [1, 6])
    with pytest.raises(ReassemblyError, match="not the same architecture"):
        merge_block_diagonal([a, b])
    c = _component("resnet", [2, 3], seed=3)
    ra.data.set_normalization(c, (0.1, 0.1, 0.1), (0.2, 0.2, 0.2))
    with pytest.raises(ReassemblyError, match="normalise their input differently"):
        assemble([a, c], "block-diagonal")


@pytest.mark.parametrize("case, message", [
    ("clash", "class 2 of cifar10 is in component 1 and component 2"),
    ("size", "different input sizes"),
    ("one", "at least two components"),
    ("mode", "assembly mode must be one of"),
])
def test_bad_assemblies_are_refused(case, message):
    a = _component("resnet", [0, 2])
    b = _component("vgg", [2, 5] if case == "clash" else [3, 5])
    if case == "size":
        b.reassembly_component["record"]["input_size"] = [3, 8, 8]
    args = {"one": ([a],), "mode": ([a, b], "sideways")}.get(case, ([a, b],))
    with pytest.raises(ReassemblyError, match=message):
        assemble(*args)


def test_components_of_different_datasets_keep_their_classes_apart():
    a, b = _component("resnet", [0, 1]), _component("vgg", [1, 0], dataset="fashion_mnist")
    assembly = assemble([a, b])
    assert assembly.reassembly_assembly["classes"] == ["cifar10:0", "cifar10:1", "fashion_mnist:1", "fashion_mnist:0"]
    assert assembly.reassembly_classes is None


def _labelled(component, n=60, seed=0, never=None):
    """Images with labels in the component's source label space. The head's bias is shifted first so that the
    random component predicts every class for some images, with positive winning logits; the labels are then its
    own predictions (all correct), except that class ``never`` gets only images the component assigns to another."""
    torch.manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8)
    classes = component.reassembly_classes
    x = ra.data.Preprocess(*ra.data.normalization_of(component))(images)
    head = component.get_submodule(list(component.reassembly_component["record"]["layers"])[-1])
    with torch.no_grad():
        head.bias += 2.0 - _logits(component, x).median(0).values
    pred = _logits(component, x).argmax(1)
    assert len(set(pred.tolist())) == len(classes)
    labels = torch.tensor([classes[p] for p in pred])
    if never is not None:
        k = classes.index(never)
        other = classes[(k + 1) % len(classes)]
        labels[pred == k] = other  # wrong for those images
        labels[(pred != k) & (torch.arange(n) % 2 == 0)] = never  # wrong too: never predicted as `never` here
    return ImageDataset(images, labels, tuple(str(c) for c in range(10)), "synthetic")


def test_scale_head_brings_the_mean_winning_logit_to_one():
    component = _component("resnet", [6, 1, 3], beta=0.3)
    data = _labelled(component)
    x = ra.data.Preprocess(*ra.data.normalization_of(component))(data.images)
    before = _logits(component, x)
    local = torch.tensor([component.reassembly_classes.index(int(c)) for c in data.labels])
    correct = before.argmax(1) == local
    ratios = scale_head(component, data, per_class=None)
    after = _logits(component, x)
    for k in range(3):
        hit = correct & (local == k)
        assert hit.any()
        assert after[hit, k].mean().item() == pytest.approx(1.0, abs=1e-4)
        assert ratios[k] == pytest.approx(1 / before[hit, k].mean().item(), rel=1e-4)
    assert max(ratios) / min(ratios) > 1.001  # the rows were scaled differently
    assert component.reassembly_component["scaling"]["ratios"] == ratios


def test_scale_head_keeps_a_class_without_correct_images_and_warns():
    component = _component("vgg", [4, 8], beta=0.3)
    data = _labelled(component, never=4)
    head = component.get_submodule(list(component.reassembly_component["record"]["layers"])[-1])
    row = head.weight[0].detach().clone()
    with pytest.warns(UserWarning, match="class 4: no correctly classified image"):
        ratios = scale_head(component, data, per_class=None)
    assert ratios[0] == 1.0 and torch.equal(head.weight[0].detach(), row)


@pytest.mark.parametrize("mode", ["parallel", "block-diagonal"])
def test_assembly_save_load_round_trip(tmp_path, mode):
    arch = "vgg" if mode == "parallel" else "resnet"
    a, b = _component("resnet", [0, 2]), _component(arch, [1, 9], seed=4)
    scale_head(b, _labelled(b), per_class=None)
    assembly = assemble([a, b], mode)
    save_assembly(assembly, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["assembly.json", "assembly.safetensors"]
    meta = json.loads((tmp_path / "merged" / "assembly.json").read_text())
    assert meta["mode"] == mode and meta["components"][1]["scaling"]["ratios"]
    for again in (load_assembly(tmp_path / "merged"), ra.create_model(str(tmp_path / "merged"))):
        x = torch.randn(3, 3, SIZE, SIZE)
        torch.testing.assert_close(_logits(again, x), _logits(assembly, x), rtol=0, atol=0)
        assert again.reassembly_classes == [0, 1, 2, 9]


def test_create_model_loads_a_saved_component(tmp_path):
    from reassembly.lego import save_component

    a = _component("resnet", [3, 1])
    save_component(a, tmp_path / "comp")
    again = ra.create_model(str(tmp_path / "comp"))
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(_logits(again, x), _logits(a, x), rtol=0, atol=0)
    assert again.reassembly_classes == [3, 1] and again.reassembly_dataset == "cifar10"


# -------------------------------------------------------------------------------------------------- calibration
def _calibration_case(seed=0):
    torch.manual_seed(seed)
    name, kwargs = ARCHS["resnet"]
    model = _randomise_bn(ra.create_model(name, **kwargs))
    x, labels = torch.randn(40, 3, SIZE, SIZE), torch.arange(40) % 10
    contributions = accumulate_contributions(model, x, labels, 10)
    images = torch.randint(0, 256, (60, 3, SIZE, SIZE), dtype=torch.uint8)
    held = ImageDataset(images, torch.arange(60) % 10, tuple(str(c) for c in range(10)), "synthetic")
    return model, contributions, held


def test_calibration_picks_the_cheapest_grid_point_that_reaches_the_target():
    model, contributions, held = _calibration_case()
    classes = [0, 3, 5]
    grid = {"conv": [(0.3, 0.2), (0.1, 0.0), (0.0, 0.0)], "linear": [(0.4, 0.3), (0.0, 0.0)]}
    calibration = calibrate_thresholds(model, contributions, classes, held, grid=grid, tolerance=5.0,
                                       input_size=(3, SIZE, SIZE))
    rows = calibration.tried
    assert len(rows) == 6
    chosen = rows[calibration.chosen]
    evaluated = [r for r in rows if r["accuracy"] is not None]
    if calibration.met:
        assert chosen["accuracy"] >= calibration.target
        cheaper = [r for r in evaluated if (r["params"], r["macs"]) < (chosen["params"], chosen["macs"])]
        assert all(r["accuracy"] < calibration.target for r in cheaper)
    else:
        assert chosen["accuracy"] == max(r["accuracy"] for r in evaluated)
    # the accuracy it reports is the masked model's, recomputed here independently
    rows_held = torch.isin(held.labels, torch.tensor(classes))
    x = ra.data.Preprocess(*ra.data.normalization_of(model))(held.images[rows_held])
    local = torch.tensor([classes.index(int(c)) for c in held.labels[rows_held]])
    acc = 100 * (masked_logits(model, calibration.masks, x).argmax(1) == local).double().mean().item()
    assert chosen["accuracy"] == pytest.approx(acc, abs=0.01)
    # and its parameter count is the extracted component's
    component = extract_component(model, calibration.masks)
    weights = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                  for m in component.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)))
    assert mask_cost(model, calibration.masks)[0] == weights


def test_calibration_with_a_lenient_target_takes_the_cheapest_and_an_unreachable_one_warns():
    model, contributions, held = _calibration_case(1)
    classes = [2, 7]
    lenient = calibrate_thresholds(model, contributions, classes, held, tolerance=100.0, input_size=(3, SIZE, SIZE))
    cheapest = min(lenient.tried, key=lambda r: (r["params"], r["macs"]))
    assert lenient.met and lenient.tried[lenient.chosen]["params"] == cheapest["params"]
    assert sum(r["accuracy"] is not None for r in lenient.tried) == 1
    # labels = the original's own restricted predictions: it scores 100 %, a much reduced component cannot
    x = ra.data.Preprocess(*ra.data.normalization_of(model))(held.images)
    own = torch.tensor(classes)[_logits(model, x)[:, classes].argmax(1)]
    mine = ImageDataset(held.images, own, held.classes, "synthetic")
    with pytest.warns(UserWarning, match="no threshold pair of the grid keeps"):
        strict = calibrate_thresholds(model, contributions, classes, mine, input_size=(3, SIZE, SIZE),
                                      grid={"conv": [(0.9, 0.9)], "linear": [(0.9, 0.9)]})
    assert not strict.met and strict.original_accuracy == 100.0


def test_calibration_restores_the_layers_whose_pruning_costs_accuracy():
    model, contributions, held = _calibration_case(2)
    classes = [2, 7]
    x = ra.data.Preprocess(*ra.data.normalization_of(model))(held.images)
    own = torch.tensor(classes)[_logits(model, x)[:, classes].argmax(1)]
    mine = ImageDataset(held.images, own, held.classes, "synthetic")  # the original scores 100 % on these
    grid = {"conv": [(0.5, 0.5)], "linear": [(0.5, 0.5)]}
    with pytest.warns(UserWarning, match="no threshold pair of the grid keeps"):
        plain = calibrate_thresholds(model, contributions, classes, mine, grid=grid, input_size=(3, SIZE, SIZE),
                                     restore=False)
    assert not plain.met and len(plain.tried) == 1 and plain.layer_costs == {}
    calibration = calibrate_thresholds(model, contributions, classes, mine, grid=grid, input_size=(3, SIZE, SIZE))
    grid_point, *restored = calibration.tried
    assert grid_point["accuracy"] < calibration.target and grid_point["kept_whole"] == []
    # every layer the grid point prunes is scored alone; the costly ones are restored, costliest first
    pruned = [n for n, layer in plain.masks.layers.items() if len(layer.keep_in) < layer.in_channels]
    assert list(calibration.layer_costs) == pruned
    costly = sorted((n for n in pruned if calibration.layer_costs[n] > 0), key=lambda n: -calibration.layer_costs[n])
    assert restored and [r["kept_whole"] for r in restored] == [costly[:k] for k in range(1, len(restored) + 1)]
    assert calibration.met and calibration.chosen == len(calibration.tried) - 1
    assert all(r["accuracy"] < calibration.target for r in restored[:-1])
    masks = calibration.masks
    assert masks.kept_whole == restored[-1]["kept_whole"]
    assert all(len(masks.layers[n].keep_in) == masks.layers[n].in_channels for n in masks.kept_whole)
    # its accuracy is the masked model's, and the extracted component computes exactly that
    acc = 100 * (masked_logits(model, masks, x).argmax(1) == own.eq(classes[1]).long()).double().mean().item()
    assert restored[-1]["accuracy"] == pytest.approx(acc, abs=0.01) and acc >= calibration.target
    component = extract_component(model, masks)
    torch.testing.assert_close(_logits(component, x), masked_logits(model, masks, x), rtol=1e-4, atol=1e-4)
    assert mask_cost(model, masks)[0] < sum(p.numel() for p in model.parameters())


def test_calibration_matching_the_loss_restores_by_loss_and_always_meets_its_target():
    model, contributions, held = _calibration_case(3)
    with torch.no_grad():
        model.linear.weight.mul_(0.1)  # logits of a few units, so that the loss is not saturated at 0
    classes = [2, 7]
    x = ra.data.Preprocess(*ra.data.normalization_of(model))(held.images)
    local = _logits(model, x)[:, classes].argmax(1)
    mine = ImageDataset(held.images, torch.tensor(classes)[local], held.classes, "synthetic")  # the original: 100 %
    grid = {"conv": [(0.5, 0.5)], "linear": [(0.5, 0.5)]}
    accuracy_only = calibrate_thresholds(model, contributions, classes, mine, grid=grid, input_size=(3, SIZE, SIZE))
    calibration = calibrate_thresholds(model, contributions, classes, mine, grid=grid, input_size=(3, SIZE, SIZE),
                                       match_loss=True)
    assert calibration.met and calibration.match_loss and calibration.original_accuracy == 100.0
    grid_point, *restored = calibration.tried
    # the grid point keeps every decision, so accuracy alone takes it; its loss is worse, so layers are restored
    assert accuracy_only.met and accuracy_only.chosen == 0 and grid_point["accuracy"] == 100.0
    assert grid_point["loss"] > calibration.original_loss and restored

    def loss(masks):
        return torch.nn.functional.cross_entropy(masked_logits(model, masks, x).double(), local).item()
    assert calibration.original_loss == pytest.approx(
        torch.nn.functional.cross_entropy(_logits(model, x)[:, classes].double(), local).item(), abs=1e-6)
    assert grid_point["loss"] == pytest.approx(loss(_grid_masks(model, contributions, classes)), abs=1e-6)
    # every pruned layer is ordered by the loss its pruning alone adds, and restored until both conditions hold
    pruned = list(calibration.layer_loss_costs)
    order = sorted(pruned, key=lambda n: (-calibration.layer_loss_costs[n], pruned.index(n)))
    assert [r["kept_whole"] for r in restored] == [order[:k] for k in range(1, len(restored) + 1)]
    chosen = calibration.tried[calibration.chosen]
    assert chosen["accuracy"] >= calibration.target and chosen["loss"] <= calibration.original_loss + 1e-6
    assert chosen["loss"] == pytest.approx(loss(calibration.masks), abs=1e-6)
    assert calibration.chosen == len(calibration.tried) - 1
    for row in restored[:-1]:  # every earlier step fails one of the two conditions
        assert row["accuracy"] < calibration.target or row["loss"] > calibration.original_loss
    # restoring every pruned layer leaves the original's restricted logits: the loop cannot run out
    everything = locate_component(model, contributions, classes, input_size=(3, SIZE, SIZE), alpha=grid_point["alpha"],
                                  beta=grid_point["beta"], keep_whole=pruned)
    torch.testing.assert_close(masked_logits(model, everything, x), _logits(model, x)[:, classes])


def _grid_masks(model, contributions, classes):
    harsh = {"conv": 0.5, "linear": 0.5}
    return locate_component(model, contributions, classes, input_size=(3, SIZE, SIZE), alpha=harsh, beta=harsh)


def test_locate_keeps_named_layers_whole_and_records_them():
    from reassembly.lego.locate import ComponentMasks

    name, kwargs = ARCHS["vgg"]
    torch.manual_seed(0)
    model = _randomise_bn(ra.create_model(name, **kwargs))
    contributions = accumulate_contributions(model, torch.randn(40, 3, SIZE, SIZE), torch.arange(40) % 10, 10)
    harsh = {"conv": 0.6, "linear": 0.6}
    pruned = locate_component(model, contributions, [1, 4], input_size=(3, SIZE, SIZE), alpha=harsh, beta=harsh)
    layer = next(n for n, m in pruned.layers.items() if len(m.keep_in) < m.in_channels)
    masks = locate_component(model, contributions, [1, 4], input_size=(3, SIZE, SIZE), alpha=harsh, beta=harsh,
                             keep_whole=[layer])
    assert masks.layers[layer].keep_in == list(range(masks.layers[layer].in_channels))
    assert masks.kept_whole == [layer] and pruned.kept_whole == []
    assert ComponentMasks.from_dict(json.loads(json.dumps(masks.to_dict()))).kept_whole == [layer]
    with pytest.raises(ReassemblyError, match="'features.99'"):
        locate_component(model, contributions, [1, 4], input_size=(3, SIZE, SIZE), keep_whole=["features.99"])


# ------------------------------------------------------------------------------------------ routes and the report
def test_route_picture_and_compression_report(tmp_path):
    name, kwargs = ARCHS["vgg"]
    torch.manual_seed(0)
    model = _randomise_bn(ra.create_model(name, **kwargs))
    x, labels = torch.randn(40, 3, SIZE, SIZE), torch.arange(40) % 10
    masks = locate_component(model, accumulate_contributions(model, x, labels, 10), [1, 4, 6],
                             input_size=(3, SIZE, SIZE), beta={"conv": 0.5, "linear": 0.5})
    path = draw_routes(masks, tmp_path / "routes.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    component = extract_component(model, masks)
    images = torch.randint(0, 256, (50, 3, SIZE, SIZE), dtype=torch.uint8)
    data = ImageDataset(images, torch.arange(50) % 10, tuple(f"c{i}" for i in range(10)), "synthetic")
    report = compression_report(model, component, data)
    assert report["params"]["component"] < report["params"]["original"]
    assert report["macs"]["component"] < report["macs"]["original"]
    per_class = report["accuracy"]["per_class"]
    assert [r["class"] for r in per_class] == [1, 4, 6] and [r["images"] for r in per_class] == [5, 5, 5]
    # the per-class numbers are what the models compute
    rows = torch.isin(data.labels, torch.tensor([1, 4, 6]))
    xs = ra.data.Preprocess(*ra.data.normalization_of(model))(data.images[rows])
    local = torch.tensor([[1, 4, 6].index(int(c)) for c in data.labels[rows]])
    acc = 100 * (_logits(component, xs).argmax(1) == local).double().mean().item()
    assert report["accuracy"]["component"] == pytest.approx(acc, abs=0.01)
