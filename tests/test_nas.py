"""DARTS with sandglass operations: published parameter counts, alpha shapes, genotype derivation, both architect
orders, forward/backward of both networks, genotype JSON, and the resumable search and train drivers."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from reassembly.data import ImageDataset
from reassembly.errors import ReassemblyError
from reassembly.nas import (
    DARTS_V1,
    DARTS_V2,
    SEARCH_SPACES,
    Architect,
    Genotype,
    GenotypeError,
    NetworkCIFAR,
    SearchNetwork,
    count_parameters,
    derive_genotype,
    load_genotype,
    load_network,
    make_operation,
    parse_cell,
    search,
    train,
)
from reassembly.zoo.models.mobilenext import SandGlass

from .test_cli import assert_one_line_error


def with_sandglass(genotype: Genotype, reduction: int) -> Genotype:
    swap = {"sep_conv_3x3": "sg_3x3", "sep_conv_5x5": "sg_5x5"}
    edges = {cell: tuple((swap.get(op, op), i) for op, i in getattr(genotype, cell)) for cell in ("normal", "reduce")}
    return dataclasses.replace(genotype, sg_reduction=reduction, **edges)


def tiny_images(n=96, classes=3, size=16, seed=0):
    """Class templates plus noise: learnable in a few steps, no download."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (classes, 3, size, size), generator=g).float()
    labels = torch.arange(n) % classes
    images = (templates[labels] + 25 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(classes)), "tiny")


# --- the published networks -----------------------------------------------------------------------------------------

def test_darts_genotypes_have_the_published_parameter_counts():
    assert count_parameters(NetworkCIFAR(DARTS_V2, channels=36, num_classes=10, cells=20, auxiliary=True)) == 3_349_342
    assert count_parameters(NetworkCIFAR(DARTS_V1, channels=36, num_classes=10, cells=20)) == 3_169_414


def test_the_auxiliary_head_is_left_out_of_the_count_only():
    network = NetworkCIFAR(DARTS_V2, channels=36, num_classes=10, cells=20, auxiliary=True)
    assert count_parameters(network, auxiliary=True) > count_parameters(network) == 3_349_342


def test_sandglass_for_separable_convs_cuts_a_quarter_of_darts_v2():
    """Spec section 3.2: every sep_conv_3x3 of DARTS_V2 as a sandglass op of the same kernel, t = 2."""
    assert count_parameters(NetworkCIFAR(with_sandglass(DARTS_V2, 2), channels=36, cells=20)) == 2_555_542
    assert count_parameters(NetworkCIFAR(with_sandglass(DARTS_V2, 6), channels=36, cells=20)) == 2_006_182


# --- operations and search spaces -------------------------------------------------------------------------------------

def test_search_spaces():
    assert len(SEARCH_SPACES["darts"]) == 8 and len(SEARCH_SPACES["extend"]) == 10
    assert SEARCH_SPACES["extend"][:8] == SEARCH_SPACES["darts"] and SEARCH_SPACES["extend"][8:] == ("sg_3x3", "sg_5x5")
    assert "sep_conv_3x3" not in SEARCH_SPACES["replace"] and len(SEARCH_SPACES["replace"]) == 8


@pytest.mark.parametrize("kernel", [3, 5])
def test_sandglass_operation_is_the_zoo_block_without_shortcut(kernel):
    op = make_operation(f"sg_{kernel}x{kernel}", 16, stride=2, affine=False, reduction=4)
    assert isinstance(op, SandGlass) and not op.use_shortcut
    convs = [m for m in op.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.groups) for c in convs] == [
        (16, 16, kernel, 1, 16), (16, 4, 1, 1, 1), (4, 16, 1, 1, 1), (16, 16, kernel, 2, 16)]
    assert all(not bn.affine for bn in op.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert op(torch.randn(2, 16, 8, 8)).shape == (2, 16, 4, 4)
    evaluated = make_operation(f"sg_{kernel}x{kernel}", 16, stride=1, affine=True)
    assert all(bn.affine for bn in evaluated.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert evaluated.conv[1][0].out_channels == 8  # the default t = 2 halves the hidden width


@pytest.mark.parametrize("name", SEARCH_SPACES["extend"])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_operation_keeps_channels_and_applies_the_stride(name, stride):
    out = make_operation(name, 8, stride, affine=False)(torch.randn(2, 8, 8, 8))
    assert out.shape == (2, 8, 8 // stride, 8 // stride)


def test_unknown_space_and_operation_are_named():
    with pytest.raises(ReassemblyError, match="unknown search space 'dartz'"):
        SearchNetwork(8, 10, 5, "dartz")
    with pytest.raises(ReassemblyError, match="unknown operation 'conv_9x9'"):
        make_operation("conv_9x9", 8, 1)


# --- the search network ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space, ops", [("darts", 8), ("extend", 10)])
def test_search_network_has_14_edges_of_alphas_per_cell_type(space, ops):
    network = SearchNetwork(channels=16, num_classes=10, cells=8, space=space)
    assert network.alphas_normal.shape == (14, ops) and network.alphas_reduce.shape == (14, ops)
    assert [c.reduction for c in network.cells] == [False, False, True, False, False, True, False, False]
    names = {n for n, _ in network.named_weights()}
    assert "alphas_normal" not in names and len(network.weights()) + 2 == len(list(network.parameters()))


def test_search_network_forward_and_backward():
    network = SearchNetwork(channels=16, num_classes=10, cells=8, space="extend")
    logits = network(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert network.alphas_normal.grad.abs().sum() > 0 and network.alphas_reduce.grad.abs().sum() > 0
    assert all(p.grad is not None for p in network.weights())


# --- genotype derivation ---------------------------------------------------------------------------------------------

def edges_in_order(steps=4):
    return [(k, j) for k in range(steps) for j in range(k + 2)]


def test_parser_never_picks_none_even_when_it_weighs_most():
    primitives = SEARCH_SPACES["extend"]
    weights = torch.full((14, 10), 0.01)
    weights[:, 0] = 0.9  # none dominates every edge
    for row, (k, j) in enumerate(edges_in_order()):
        weights[row, 1 + (row % 9)] = 0.02 + 0.001 * row if j != 1 else 0.05  # input 1 strongest, then the latest
    gene = parse_cell(weights, primitives)
    assert len(gene) == 8 and all(op != "none" for op, _ in gene)
    # node k keeps input 1 (strongest) and then its most recent predecessor
    assert [i for _, i in gene] == [1, 0, 1, 2, 1, 3, 1, 4]


@pytest.mark.parametrize("seed", range(5))
def test_parser_keeps_two_distinct_earlier_inputs_per_node(seed):
    torch.manual_seed(seed)
    genotype = derive_genotype(torch.randn(14, 8) * 3, torch.randn(14, 8) * 3, SEARCH_SPACES["darts"])
    for cell in (genotype.normal, genotype.reduce):
        assert len(cell) == 8 and "none" not in {op for op, _ in cell}
        for k in range(4):
            (_, a), (_, b) = cell[2 * k: 2 * k + 2]
            assert a != b and 0 <= a < k + 2 and 0 <= b < k + 2
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3, 4, 5)


def test_parser_picks_the_strongest_edges_and_operations():
    primitives = SEARCH_SPACES["darts"]
    weights = torch.zeros(14, 8)
    weights[0, primitives.index("sep_conv_5x5")] = 0.5  # node 2, input 0
    weights[1, primitives.index("max_pool_3x3")] = 0.7  # node 2, input 1 (stronger: listed first)
    weights[4, primitives.index("dil_conv_3x3")] = 0.9  # node 3, input 2
    weights[2, primitives.index("skip_connect")] = 0.3  # node 3, input 0
    gene = parse_cell(weights, primitives)
    assert gene[:4] == (("max_pool_3x3", 1), ("sep_conv_5x5", 0), ("dil_conv_3x3", 2), ("skip_connect", 0))


# --- the architect ---------------------------------------------------------------------------------------------------

@pytest.fixture
def small_search():
    torch.manual_seed(0)
    network = SearchNetwork(channels=4, num_classes=3, cells=3, space="extend")
    optimizer = torch.optim.SGD(network.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(network(x), y).backward(inputs=network.weights())
    optimizer.step()  # momentum buffers exist, as in a running search
    return network, optimizer, x, y


@pytest.mark.parametrize("order", ["first", "second"])
def test_architect_step_changes_alphas_and_leaves_the_weights(small_search, order):
    network, optimizer, x, y = small_search
    alphas = [a.detach().clone() for a in network.arch_parameters()]
    weights = {n: p.detach().clone() for n, p in network.named_weights()}
    Architect(network, optimizer, order).step(x, y, x.flip(0), y.flip(0), xi=0.025)
    assert all(not torch.equal(a, b) for a, b in zip(alphas, network.arch_parameters()))
    for name, p in network.named_weights():
        assert p.shape == weights[name].shape and torch.equal(p, weights[name]), name


def test_second_order_without_a_virtual_step_is_first_order(small_search):
    network, optimizer, x, y = small_search
    network.eval()  # batch statistics would differ between the two passes otherwise
    first = torch.autograd.grad(F.cross_entropy(network(x), y), network.arch_parameters())
    _, second = Architect(network, optimizer, "second")._second_order(x, y, x, y, xi=0.0)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_second_order_gradient_matches_the_unrolled_objective(small_search):
    """d/d alpha of L_val(w - xi grad_w L_train(w, alpha), alpha) by autograd through the step, against the
    architect's finite-difference Hessian-vector product (plain SGD: no momentum, no decay). In float64 and with a
    tiny difference radius: at DARTS's radius (0.01) the perturbed weights cross ReLU and max-pool kinks, which
    autograd's second derivative does not see."""
    network, _, x, y = small_search
    network.double().eval()
    x = x.double()
    optimizer = torch.optim.SGD(network.weights(), lr=0.1)
    xi = 0.1
    names, weights = zip(*network.named_weights())
    alphas = network.arch_parameters()
    arch = dict(zip(("alphas_normal", "alphas_reduce"), alphas))
    buffers = dict(network.named_buffers())
    call = torch.func.functional_call
    train_loss = F.cross_entropy(call(network, ({**dict(zip(names, weights)), **arch}, buffers), (x,)), y)
    grads = torch.autograd.grad(train_loss, weights, create_graph=True)
    stepped = {n: w - xi * g for n, w, g in zip(names, weights, grads)}
    val_loss = F.cross_entropy(call(network, ({**stepped, **arch}, buffers), (x.flip(0),)), y.flip(0))
    exact = torch.autograd.grad(val_loss, alphas)
    _, approx = Architect(network, optimizer, "second", radius=1e-6)._second_order(x, y, x.flip(0), y.flip(0), xi)
    for a, b in zip(exact, approx):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


# --- the evaluation network -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("genotype, cells, channels", [(DARTS_V2, 20, 36), (with_sandglass(DARTS_V2, 2), 8, 16)],
                         ids=["darts_v2", "sandglass"])
def test_evaluation_network_forward_and_backward(genotype, cells, channels):
    network = NetworkCIFAR(genotype, channels=channels, num_classes=10, cells=cells, auxiliary=True, drop_path=0.2)
    logits, auxiliary = network.forward_with_auxiliary(torch.randn(2, 3, 32, 32))
    assert logits.shape == auxiliary.shape == (2, 10)
    (F.cross_entropy(logits, torch.tensor([3, 4])) + 0.4 * F.cross_entropy(auxiliary, torch.tensor([3, 4]))).backward()
    assert all(p.grad is not None for p in network.parameters())
    assert network.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_drop_path_ramps_with_the_training_steps():
    network = NetworkCIFAR(DARTS_V1, channels=4, num_classes=3, cells=3, drop_path=0.3, drop_path_ramp=4)
    x = torch.randn(2, 3, 16, 16)
    seen = []
    for _ in range(6):
        seen.append(network.current_drop_path())
        network(x)
    assert seen == pytest.approx([0, 0.075, 0.15, 0.225, 0.3, 0.3])
    network.eval()(x)
    assert network.steps_seen.item() == 6  # evaluation does not count


# --- genotypes as data ----------------------------------------------------------------------------------------------

def test_genotype_round_trips_through_json(tmp_path):
    genotype = with_sandglass(DARTS_V2, 4)
    assert Genotype.from_json(genotype.to_json()) == genotype
    genotype.save(tmp_path / "g.json")
    assert load_genotype(tmp_path / "g.json") == genotype
    genotype.save(tmp_path / "genotype.json")
    assert load_genotype(tmp_path) == genotype  # a search's run directory
    assert load_genotype("DARTS_V2") is DARTS_V2 and load_genotype("darts_v1") is DARTS_V1


@pytest.mark.parametrize("payload, needle", [
    ({"normal": DARTS_V2.to_dict()["normal"], "normal_concat": [2, 3, 4, 5], "reduce_concat": [2, 3, 4, 5]},
     "key 'reduce' is missing"),
    ({**DARTS_V2.to_dict(), "normal_concat": [2, 9]}, "key 'normal_concat' must list distinct nodes"),
    ({**DARTS_V2.to_dict(), "reduce": [["max_pool_3x3", 0], ["conv_9x9", 1]] + DARTS_V2.to_dict()["reduce"][2:]},
     "reduce[1] names unknown operation 'conv_9x9'"),
    ({**DARTS_V2.to_dict(), "normal": DARTS_V2.to_dict()["normal"][:7] + [["skip_connect", 5]]},
     "normal[7] takes input 5"),
    ({**DARTS_V2.to_dict(), "normal": [["none", 0]] + DARTS_V2.to_dict()["normal"][1:]}, "normal[0] is 'none'"),
    ({**DARTS_V2.to_dict(), "sg_reduction": 0}, "key 'sg_reduction'"),
    ({**DARTS_V2.to_dict(), "extra": 1}, "unknown key 'extra'"),
    ([1, 2], "a genotype is a JSON object"),
])
def test_malformed_genotypes_name_the_key(payload, needle):
    with pytest.raises(GenotypeError) as info:
        Genotype.from_dict(payload, source="g.json")
    assert needle in str(info.value) and "g.json" in str(info.value)


def test_unreadable_and_unknown_genotypes(tmp_path):
    (tmp_path / "bad.json").write_text("{normal: ")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        load_genotype(tmp_path / "bad.json")
    with pytest.raises(GenotypeError, match="not one of DARTS_V1, DARTS_V2"):
        load_genotype("DARTS_V3")


# --- the drivers ----------------------------------------------------------------------------------------------------

SEARCH = {"space": "extend", "epochs": 2, "cells": 3, "channels": 4, "subset": 32, "batch_size": 8, "seed": 1}


def test_search_writes_history_and_genotype_and_resumes_exactly(tmp_path):
    data = tiny_images()
    straight = search(data, tmp_path / "straight", progress=False, **SEARCH)
    part = search(data, tmp_path / "split", progress=False, stop_after=1, **SEARCH)
    assert part["epochs"] == 1 and not (tmp_path / "split" / "genotype.json").exists()
    search(data, tmp_path / "split", progress=False, **SEARCH)
    a = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)["network"]
    b = torch.load(tmp_path / "split" / "state.pt", weights_only=True)["network"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "straight" / "alphas.json").read_text())
    assert [e["epoch"] for e in history["history"]] == [0, 1, 2] and len(history["primitives"]) == 10
    assert torch.tensor(history["history"][2]["normal"]).shape == (14, 10)
    genotype = load_genotype(tmp_path / "straight" / "genotype.json")
    assert genotype.to_dict() == straight["genotype"] == history["history"][2]["genotype"]
    assert len((tmp_path / "straight" / "log.jsonl").read_text().splitlines()) == 2


def test_second_order_search_runs(tmp_path):
    settings = {**SEARCH, "epochs": 1, "order": "second", "subset": 16}
    summary = search(tiny_images(), tmp_path / "run", progress=False, **settings)
    assert summary["epochs"] == 1 and "genotype" in summary


def test_search_refuses_other_settings_and_bad_sizes(tmp_path):
    data = tiny_images()
    search(data, tmp_path / "run", progress=False, stop_after=1, **SEARCH)
    with pytest.raises(ReassemblyError, match="other settings"):
        search(data, tmp_path / "run", progress=False, **{**SEARCH, "channels": 6})
    for key, value, needle in (("epochs", 0, "--epochs must be positive"), ("cells", 2, "--cells must be at least 3"),
                               ("subset", 10, "fewer than one batch"), ("space", "dartz", "unknown search space"),
                               ("order", "third", "--order must be first or second")):
        with pytest.raises(ReassemblyError, match=needle):
            search(data, tmp_path / "other", progress=False, **{**SEARCH, key: value})


def test_train_builds_trains_and_reloads_the_network(tmp_path):
    data = tiny_images()
    result = train("DARTS_V2", data, tmp_path / "run", test_data=data, cells=3, channels=4, epochs=2, batch_size=16,
                   drop_path=0.1, progress=False)
    assert result["epochs"] == 2 and result["parameters"] > 0 and "test_top1" in result["final"]
    network = load_network(tmp_path / "run")
    assert count_parameters(network) == result["parameters"] and network.steps_seen.item() == 2 * 6
    structure = json.loads((tmp_path / "run" / "network.json").read_text())
    assert structure["genotype"] == DARTS_V2.to_dict() and structure["cells"] == 3
    with pytest.raises(ReassemblyError, match="another network"):
        train("DARTS_V1", data, tmp_path / "run", cells=3, channels=4, epochs=2, batch_size=16, progress=False)
    with pytest.raises(ReassemblyError, match="--channels must be positive"):
        train("DARTS_V1", data, tmp_path / "other", channels=0, progress=False)


def test_train_resumes_exactly_drop_path_ramp_included(tmp_path):
    data = tiny_images(n=48)
    settings = {"cells": 3, "channels": 4, "epochs": 2, "batch_size": 16, "drop_path": 0.2, "progress": False}
    train(DARTS_V1, data, tmp_path / "straight", **settings)
    assert train(DARTS_V1, data, tmp_path / "split", stop_after=1, **settings)["epochs"] == 1
    train(DARTS_V1, data, tmp_path / "split", **settings)
    a, b = load_network(tmp_path / "straight").state_dict(), load_network(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a["steps_seen"].item() == 6


# --- the command line -----------------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "reassembly", "nas", *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize("verb", [[], ["search"], ["train"], ["show"]])
def test_nas_verbs_have_help(verb):
    out = cli(*verb, "--help").stdout
    assert "Usage:" in out and len(out.splitlines()) > 5


def test_nas_show_prints_the_published_count():
    proc = cli("show", "DARTS_V2")
    assert proc.returncode == 0, proc.stderr
    assert "3,349,342 parameters" in proc.stdout and "dil_conv_3x3(2)" in proc.stdout


@pytest.mark.parametrize("args, needles", [
    (["search", "--space", "sandglass", "--out", "X"], ["unknown search space 'sandglass'", "extend"]),
    (["search", "--epochs", "0", "--out", "X"], ["'--epochs'", "x>=1"]),
    (["search", "--channels", "-4", "--out", "X"], ["'--channels'", "x>=1"]),
    (["train", "DARTS_V9", "--out", "X"], ["unknown genotype 'DARTS_V9'"]),
    (["train", "DARTS_V2", "--cells", "0", "--out", "X"], ["'--cells'", "x>=1"]),
    (["show", "DARTS_V2", "--channels", "0"], ["'--channels'", "x>=1"]),
])
def test_nas_bad_input_is_one_line(tmp_path, args, needles):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    assert_one_line_error(cli(*args), *needles)


def test_nas_train_names_the_broken_key(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps({k: v for k, v in DARTS_V2.to_dict().items() if k != "normal_concat"}))
    assert_one_line_error(cli("train", str(path), "--out", str(tmp_path / "out")), "key 'normal_concat' is missing",
                          str(path))


def test_nas_search_on_a_real_dataset_and_its_run_directory(tmp_path):
    args = ["search", "--data", "digits", "--out", str(tmp_path / "run"), "--epochs", "1", "--cells", "3",
            "--subset", "32", "--batch-size", "16", "--space", "extend", "--threads", "1"]
    first = cli(*args, "--channels", "4")
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and (tmp_path / "run" / "genotype.json").is_file()
    assert_one_line_error(cli(*args, "--channels", "6"), "holds a search with other settings", "resume")
