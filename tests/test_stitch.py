"""Stitching: the layers' plans and shapes, the reassembled network, its save/reload, least-squares init, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from reassembly.measure import count_params
from reassembly.stitch import (
    End,
    Stitch,
    StitchError,
    build_network,
    parse_blocks,
    plan_stitch,
    pretrained_block,
)
from reassembly.stitch.init import RidgeFit, least_squares_init
from reassembly.stitch.io import load_net, save_net

from .conftest import needs_cifar
from .test_cli import assert_one_line_error, run

THREE = "resnet20_cifar5:1-4,mobilenext_cifar5:3-9,vit_cifar5:4-7"  # a CNN, a MobileNet-family model, the ViT


def map_end(width, side):
    return End("nchw", width, (side, side))


def token_end(width, side, prefix=1):
    return End("tokens", width, (side, side), prefix)


@pytest.fixture(scope="module")
def three():
    blocks = [pretrained_block(*spec) for spec in parse_blocks(THREE)]
    torch.manual_seed(0)
    return blocks, build_network(blocks, num_classes=5)


# -- plans and layers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arriving, trained, stride", [(32, 32, 1), (32, 16, 2), (32, 8, 4), (16, 32, 1), (24, 16, 1),
                                                       (8, 2, 4)])
def test_the_stride_follows_the_size_ratio_deterministically(arriving, trained, stride):
    plan = plan_stitch(map_end(16, arriving), map_end(32, trained), (arriving, arriving), fixed_size=False)
    assert plan.stride == stride and plan.resize_to is None
    out = Stitch(plan)(torch.randn(2, 16, arriving, arriving))
    assert out.shape == (2, 32, arriving // stride, arriving // stride)


def test_eval_mode_folds_batch_norm_into_the_conv_without_changing_the_function():
    stitch = Stitch(plan_stitch(map_end(16, 32), map_end(32, 16), (32, 32), fixed_size=False))
    stitch.norm.running_mean.uniform_(-1, 1)
    stitch.norm.running_var.uniform_(0.5, 2)
    stitch.norm.weight.data.uniform_(0.5, 2)
    stitch.norm.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 16, 32, 32)
    stitch.eval()
    unfolded = stitch.act(stitch.proj(stitch.norm(x)))
    assert torch.allclose(stitch(x), unfolded, atol=1e-5)
    from reassembly.stitch.net import Stem, StemPlan

    stem = Stem(StemPlan("new", 3, map_end(16, 32), 1))
    stem.norm.running_mean.uniform_(-1, 1)
    stem.norm.running_var.uniform_(0.5, 2)
    stem.eval()
    image = torch.randn(2, 3, 32, 32)
    assert torch.allclose(stem(image), stem.act(stem.norm(stem.conv(image))), atol=1e-5)


def test_a_block_that_runs_at_one_size_only_gets_an_explicit_resize():
    plan = plan_stitch(map_end(16, 8), map_end(32, 16), (8, 8), fixed_size=True)
    assert plan.resize_to == (16, 16)
    assert Stitch(plan)(torch.randn(2, 16, 8, 8)).shape == (2, 32, 16, 16)
    assert "resize" in Stitch(plan).extra_repr()


def test_map_to_tokens_adds_the_class_token_the_next_block_expects():
    plan = plan_stitch(map_end(64, 8), token_end(128, 8), (8, 8), fixed_size=False)
    assert plan.kind == "conv" and plan.class_token
    stitch = Stitch(plan)
    out = stitch(torch.randn(3, 64, 8, 8))
    assert out.shape == (3, 65, 128)
    assert torch.equal(out[:, 0], stitch.class_token[0, 0].expand(3, -1))


def test_tokens_to_map_drops_the_class_token_and_lays_patches_on_their_grid():
    plan = plan_stitch(token_end(128, 8), map_end(64, 8), (8, 8), fixed_size=False)
    stitch = Stitch(plan).eval()
    tokens = torch.randn(2, 65, 128)
    out = stitch(tokens)
    assert out.shape == (2, 64, 8, 8)
    changed = tokens.clone()
    changed[:, 0] += 100  # the class token does not reach the map
    assert torch.equal(stitch(changed), out)


def test_tokens_to_tokens_is_layernorm_linear_and_keeps_a_shared_class_token():
    plan = plan_stitch(token_end(128, 8), token_end(192, 8), (8, 8), fixed_size=False)
    assert plan.kind == "linear" and not plan.class_token
    stitch = Stitch(plan)
    assert isinstance(stitch.norm, torch.nn.LayerNorm) and isinstance(stitch.proj, torch.nn.Linear)
    assert stitch(torch.randn(2, 65, 128)).shape == (2, 65, 192)
    dropped = plan_stitch(token_end(128, 8), token_end(192, 8, prefix=0), (8, 8), fixed_size=False)
    assert Stitch(dropped)(torch.randn(2, 65, 128)).shape == (2, 64, 192)


def test_ends_that_are_not_maps_or_tokens_cannot_be_stitched():
    with pytest.raises(StitchError, match="neither a feature map nor tokens"):
        plan_stitch(End("vector", 64, None), map_end(16, 8), None, fixed_size=False, where="a:1-2 -> b:3-4")


def test_a_map_too_small_for_the_stride_is_refused():
    plan = plan_stitch(map_end(16, 2), map_end(16, 1), (2, 2), fixed_size=False)
    assert plan.stride == 2  # 2x2 -> 1x1 is fine
    with pytest.raises(StitchError, match="a:1-2 -> b:3-4"):
        plan_stitch(End("vector", 16, None), map_end(16, 1), None, fixed_size=False, where="a:1-2 -> b:3-4")


def test_parse_blocks_reads_specs_and_names_what_it_cannot_read():
    assert parse_blocks(" a:0-4, b_c:3-10 ") == [("a", 0, 4), ("b_c", 3, 10)]
    for bad, needle in [("a:4-2", "empty"), ("a:1", "NAME:START-STOP"), ("", "no blocks")]:
        with pytest.raises(StitchError, match=needle):
            parse_blocks(bad)


def test_ridge_fit_recovers_a_linear_map_with_intercept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    w, c = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    fit = RidgeFit(6, 3)
    for part in x.split(128):
        fit.add(part, part @ w.T + c)
    weight, intercept = fit.solve(ridge=1e-9)
    assert torch.allclose(weight, w, atol=1e-6) and torch.allclose(intercept, c, atol=1e-6)
    assert fit.residual(weight) < 1e-10


# -- the network -----------------------------------------------------------------------------------------------------
def test_three_architectures_stitch_into_one_network(three):
    _, net = three
    kinds = [(s.plan.source.format, s.plan.target.format, s.plan.stride) for s in net.stitches]
    assert kinds == [("nchw", "nchw", 2), ("nchw", "tokens", 1)]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert net.specs == THREE.split(",")


def test_blocks_of_one_model_that_continue_each_other_need_no_stitch():
    blocks = [pretrained_block(*spec) for spec in parse_blocks("resnet20_cifar5:1-4,resnet20_cifar5:4-6")]
    net = build_network(blocks, num_classes=3)
    assert net.stitches[0].plan.kind == "identity" and count_params(net.stitches[0]) == 0


def test_frozen_blocks_keep_their_batch_norm_statistics_unless_asked(three):
    blocks, _ = three
    net = build_network(blocks, num_classes=5).freeze_blocks(norm="eval")
    before = {k: v.clone() for k, v in net.blocks.state_dict().items()}
    net.train()
    assert net.stem.training and net.head.training and not net.blocks[0].training
    assert all(not p.requires_grad for p in net.blocks.parameters())
    assert all(p.requires_grad for p in net.stitches.parameters())
    net(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in net.blocks.state_dict().items())
    net.freeze_blocks(norm="train").train()
    assert net.blocks[0].training
    net(torch.randn(4, 3, 32, 32))
    assert any(not torch.equal(before[k], v) for k, v in net.blocks.state_dict().items() if "running" in k)


def test_save_holds_only_used_weights_and_reloads_identically_in_a_fresh_process(three, tmp_path):
    _, net = three
    net.eval()
    save_net(net, tmp_path / "net")
    saved = load_file(str(tmp_path / "net" / "model.safetensors"))
    assert saved.keys() == net.state_dict().keys()
    trainable = sum(v.numel() for k, v in saved.items() if not k.rsplit(".", 1)[-1].startswith(("running", "num_")))
    assert trainable == count_params(net) < sum(count_params(b.model) for b in three[0])
    x = torch.randn(4, 3, 32, 32)
    torch.save({"x": x, "y": net(x).detach()}, tmp_path / "io.pt")
    script = ("import torch, sys; torch.set_num_threads(1); from reassembly.stitch.io import load_net; "
              "net = load_net(sys.argv[1]); "
              "d = torch.load(sys.argv[2]); print(float((net(d['x']) - d['y']).abs().max()))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "net"), str(tmp_path / "io.pt")],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 0.0


def test_the_network_exports_with_torch_export(three):
    _, net = three
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(net, (x,))
    assert torch.allclose(exported.module()(x), net(x), atol=1e-6)


def test_a_network_counts_its_parameters_and_macs(three, tmp_path):
    _, net = three
    save_net(net, tmp_path / "net")
    record = json.loads((tmp_path / "net" / "structure.json").read_text())
    assert record["params"] == count_params(net)
    assert record["macs"] > sum(0 for _ in net.blocks)
    assert [b["spec"] for b in record["blocks"]] == THREE.split(",")


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_three_architectures_train_one_epoch_save_and_reload_identically(tmp_path, mode):
    from reassembly.checkpoint import read_state_dict
    from reassembly.stitch.stage import stitch_stage
    from reassembly.stitch.training import RECIPE, train_network

    stitch_stage(THREE, "digits", tmp_path / "net", probe_size=100, max_per_class=20, progress=False)
    recipe = RECIPE.model_copy(update={"epochs": 1, "batch_size": 50})
    result = train_network(tmp_path / "net", "digits", mode, recipe=recipe, max_per_class=20, progress=False)
    assert result["epochs"] == 1 and result["final"]["test_top1"] > 10  # 10 classes
    before, trained = load_net(tmp_path / "net"), load_net(result["out"])
    final, _ = read_state_dict(tmp_path / "net" / f"train-{mode}" / "final.safetensors")
    assert all(torch.equal(final[k], v) for k, v in trained.state_dict().items())
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert any(k.startswith("stitches.") for k in changed) and any(k.startswith("head.") for k in changed)
    assert any(k.startswith("blocks.") for k in changed) == (mode == "full")
    x = torch.randn(3, 3, 32, 32)
    torch.save({"x": x, "y": trained(x).detach()}, tmp_path / "io.pt")
    script = ("import torch, sys; torch.set_num_threads(1); from reassembly.stitch.io import load_net; "
              "net = load_net(sys.argv[1]); d = torch.load(sys.argv[2]); print(torch.equal(net(d['x']), d['y']))")
    out = subprocess.run([sys.executable, "-c", script, result["out"], str(tmp_path / "io.pt")], check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr


# -- least-squares initialisation ------------------------------------------------------------------------------------
@needs_cifar
def test_least_squares_init_beats_the_default_before_any_training(three):
    """The same network with least-squares stem, stitches and head against default stem and stitches with the same
    ridge-fitted head: fitted stitches carry the pretrained blocks' features through."""
    from reassembly.data import load_dataset
    from reassembly.train import evaluate

    blocks, _ = three
    train, test = load_dataset("cifar10[5:10]", "train"), load_dataset("cifar10[5:10]", "test")
    probe = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:500])
    check = test.subset(range(0, len(test), 10))
    scores = {}
    for init, parts in (("least-squares", ("stem", "stitches", "head")), ("default", ("head",))):
        torch.manual_seed(0)
        net = build_network(blocks, num_classes=5)
        report = least_squares_init(net, blocks, probe.images, probe.labels, parts=parts, progress=False)
        assert len(report["fits"]) == (4 if init == "least-squares" else 1)
        assert all(0 <= fit["residual"] < 1 for fit in report["fits"])
        scores[init] = evaluate(net, check, net.structure.mean, net.structure.std, progress=False).top1
    assert scores["least-squares"] > scores["default"] + 5, scores


def test_the_stitch_stage_fits_on_the_probe_that_probe_split_names(tmp_path):
    """Tools that study the fit (benchmarks/stitch_mode_gap.py) rebuild the probe with ``probe_split``: refitting a
    fresh network on exactly those images reproduces the saved one, and the probe and the rest never overlap."""
    from reassembly.data import load_dataset
    from reassembly.stitch.stage import probe_split, stitch_stage

    saved = stitch_stage("resnet20_cifar5:1-4", "digits", tmp_path / "net", probe_size=60, seed=3, max_per_class=20,
                         progress=False)
    blocks = [pretrained_block("resnet20_cifar5", 1, 4)]
    train = load_dataset("digits", "train", image_size=32, channels=3, max_per_class=20, seed=0)  # as the stage does
    probe_ids, rest_ids = probe_split(len(train), 60, seed=3)
    assert len(probe_ids) == 60 and sorted(torch.cat([probe_ids, rest_ids]).tolist()) == list(range(len(train)))
    torch.manual_seed(3)
    net = build_network(blocks, train.num_classes, classes=list(train.classes))
    least_squares_init(net, blocks, train.images[probe_ids], train.labels[probe_ids], progress=False)
    assert torch.allclose(net.head.fc.weight, saved["net"].head.fc.weight)
    other = probe_split(len(train), 60, seed=4)[0]
    assert not torch.equal(other, probe_ids)


def test_recalibrate_batch_norms_sets_the_statistics_of_the_batches_and_keeps_each_momentum():
    from reassembly.stitch.init import recalibrate_batch_norms

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.Conv2d(4, 4, 1),
                                torch.nn.BatchNorm2d(4))
    batches = [3 + 2 * torch.randn(10, 4, 5, 5) for _ in range(3)]
    assert recalibrate_batch_norms(block, batches) == 2
    assert not block.training and [m.momentum for m in (block[0], block[2])] == [0.3, 0.1]
    every = torch.cat(batches)
    assert torch.allclose(block[0].running_mean, every.mean((0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([b.var((0, 2, 3)) for b in batches]).mean(0)  # the unbiased variance of each batch
    assert torch.allclose(block[0].running_var, per_batch, atol=1e-4)


def test_recalibrated_least_squares_init_agrees_with_training_mode_on_unseen_images(tmp_path):
    """A block's batch-norm keeps its source data's statistics unless recalibrated; training normalises by the target
    batch's own. With ``recalibrate_norms`` the network's eval-mode and train-mode logits on images outside the probe
    come much closer (the gap ``benchmarks/stitch_mode_gap.py`` measures on the Split-CIFAR networks)."""
    from reassembly.data import load_dataset, normalize
    from reassembly.stitch.stage import probe_split, stitch_stage

    train = load_dataset("digits", "train", image_size=32, channels=3, max_per_class=60, seed=0)
    _, held = probe_split(len(train), 200, seed=0)
    gaps, counts = {}, {}
    for recalibrate in (False, True):
        result = stitch_stage("resnet20_cifar5:1-4,mobilenetv2_cifar5:5-10", "digits", tmp_path / str(recalibrate),
                              probe_size=200, max_per_class=60, recalibrate_norms=recalibrate, progress=False)
        net = result["net"]
        x = normalize(train.images[held[:128]], net.structure.mean, net.structure.std)
        with torch.no_grad():
            eval_logits, train_logits = net.eval()(x), net.train()(x)
        gaps[recalibrate] = float((train_logits - eval_logits).abs().mean() / eval_logits.abs().mean())
        counts[recalibrate] = result["init"].get("recalibrated_norms")
    assert counts[False] is None and counts[True] > 10  # every block norm of both blocks
    assert gaps[True] < gaps[False] / 2, gaps


# -- the command line and bad input ----------------------------------------------------------------------------------
def test_stitch_train_and_eval_clis_on_digits(tmp_path):
    net_dir = tmp_path / "net"
    proc = run("stitch", "--blocks", "resnet20_cifar5:1-4,vgg11_cifar5:2-3", "--data", "digits",
               "--probe-size", "200", "--out", str(net_dir))
    assert "stitch 0" in proc.stdout and "least-squares fit on 200 images" in proc.stdout
    net = load_net(net_dir)
    assert net.structure.head.num_classes == 10
    assert net.stitches[0].plan.stride == 4  # 32x32 maps into a block trained on 8x8
    before = float(run("eval", "--model", str(net_dir), "--data", "digits").stdout.split("top-1 ")[1].split("%")[0])
    assert before > 50  # least squares alone, 10 classes
    run("train", str(net_dir), "--data", "digits", "--epochs", "1", "--max-per-class", "10", "--no-flip")
    assert (net_dir / "train-frozen" / "MODEL_CARD.md").is_file()
    assert "top-1" in run("eval", "--model", str(net_dir / "train-frozen"), "--data", "digits").stdout
    assert_one_line_error(run("train", str(net_dir), "--data", "digits[0:2]", check_ok=False), "classifies 10",
                          "has 2")
    run("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits", "--probe-size", "50", "--overwrite",
        "--out", str(net_dir))
    assert_one_line_error(run("train", str(net_dir), "--data", "digits", "--epochs", "1", check_ok=False),
                          "started from another network")


def test_stitch_takes_the_choice_of_a_search(tmp_path):
    from .conftest import REPO

    search = REPO / "results" / "search" / "split-cifar-naswot-0.5M-60M.json"
    run("stitch", "--choice", str(search), "--data", "digits", "--probe-size", "60", "--out", str(tmp_path / "net"))
    assert ",".join(load_net(tmp_path / "net").specs) == json.loads(search.read_text())["choice"]["blocks"]
    assert_one_line_error(run("stitch", "--choice", str(REPO / "results" / "split-cifar" / "partition.json"),
                              "--data", "digits", "--out", str(tmp_path / "other"), check_ok=False),
                          "not a search result")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("blocks, needles", [
    ("resnet20_cifar5:1-40", ["resnet20_cifar5:1-40", "outside the chain", "nodes 0..10"]),
    ("resnet20_cifar5:9-11,vgg11_cifar5:2-3", ["resnet20_cifar5:9-11 -> vgg11_cifar5:2-3",
                                               "neither a feature map nor tokens"]),
    ("resnet20_cifar5:1-11", ["resnet20_cifar5:1-11 ends in vector", "head"]),
    ("resnet2O_cifar5:1-4", ["no shipped model named 'resnet2O_cifar5'"]),
    ("resnet20_cifar5:4-1", ["empty"]),
])
def test_stitch_bad_blocks_fail_in_one_line_and_write_nothing(tmp_path, blocks, needles):
    out = tmp_path / "net"
    proc = run("stitch", "--blocks", blocks, "--data", "digits", "--out", str(out), check_ok=False)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_stitch_refuses_recalibrated_norms_without_least_squares(tmp_path):
    proc = run("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits", "--init", "default",
               "--recalibrate-norms", "--out", str(tmp_path / "net"), check_ok=False)
    assert_one_line_error(proc, "--recalibrate-norms", "--init least-squares")
    assert not (tmp_path / "net").exists()


@pytest.fixture()
def saved(three, tmp_path):
    return save_net(three[1], tmp_path / "net")


def test_weights_that_do_not_belong_to_the_structure_are_refused(saved, three, tmp_path):
    other = build_network(three[0], num_classes=3)
    save_net(other, tmp_path / "other")
    (saved / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(Exception, match="not the weights file"):
        load_net(saved)


def test_a_corrupt_weights_file_is_refused(saved):
    record = json.loads((saved / "structure.json").read_text())
    data = (saved / "model.safetensors").read_bytes()[:1000]
    (saved / "model.safetensors").write_bytes(data)
    from reassembly.zoo.pretrained import sha256_of

    record["weights"]["sha256"] = sha256_of(saved / "model.safetensors")  # even when the hash is made to match
    (saved / "structure.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match="not a readable safetensors file"):
        load_net(saved)


def test_eval_of_a_network_with_corrupt_weights_fails_in_one_line(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_one_line_error(run("eval", "--model", str(saved), "--data", "digits", check_ok=False),
                          "model.safetensors is not the weights file")


def test_a_structure_whose_chain_changed_is_refused(saved):
    record = json.loads((saved / "structure.json").read_text())
    record["blocks"][1]["fingerprint"] = "0" * 16
    (saved / "structure.json").write_text(json.dumps(record))
    with pytest.raises(StitchError, match="mobilenext_cifar5:3-9.*fingerprint"):
        load_net(saved)


def test_a_directory_without_a_network_is_explained(tmp_path):
    with pytest.raises(StitchError, match="not a saved network"):
        load_net(tmp_path)
    (tmp_path / "structure.json").write_text("{not json")
    with pytest.raises(StitchError, match="not valid JSON"):
        load_net(tmp_path)


def test_a_block_from_scratch_has_the_pretrained_architecture_and_fresh_weights():
    pretrained = pretrained_block("resnet20_cifar5", 1, 4)
    torch.manual_seed(0)
    scratch = pretrained_block("resnet20_cifar5", 1, 4, pretrained=False)
    assert scratch.ref == pretrained.ref  # the same architecture, input size, cut and node range
    a, b = pretrained.block.state_dict(), scratch.block.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    weights = [k for k in a if a[k].ndim > 1]
    assert weights and not any(torch.equal(a[k], b[k]) for k in weights)


# -- the least-squares head ------------------------------------------------------------------------------------------
class _Head(torch.nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.pool, self.fc = torch.nn.Identity(), torch.nn.Linear(width, classes)


def _fit_head_on(features, labels, head="fit"):
    from types import SimpleNamespace

    from reassembly.stitch.init import HEAD_RIDGES, _fit_head

    net = SimpleNamespace(head=_Head(features.shape[1], int(labels.max()) + 1))
    bar = SimpleNamespace(update=lambda: None)
    with torch.no_grad():
        report = _fit_head(net, [features], labels, [(0, len(features))], HEAD_RIDGES, bar, head)
    return net.head.fc, report


def test_the_head_penalty_and_temperature_are_chosen_on_held_out_probe_images():
    """Features that say nothing of the labels: a head chosen on its own fit images would fit the noise, the held-out
    choice takes the largest penalty and reports chance accuracy. Separable features: a small penalty, and the
    held-out images are classified."""
    from reassembly.stitch.init import HEAD_RIDGES

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=generator)
    noise = torch.randn(300, 150, generator=generator)
    _, report = _fit_head_on(noise, labels)
    assert report["ridge"] == max(HEAD_RIDGES) and report["held_out_images"] == 60
    assert report["held_out_top1"] < 40
    signal = 3 * torch.nn.functional.one_hot(labels, 20).float() + 0.3 * torch.randn(300, 20, generator=generator)
    fc, report = _fit_head_on(signal, labels)
    assert report["ridge"] < max(HEAD_RIDGES) and report["held_out_top1"] > 95
    assert (fc(signal).argmax(1) == labels).float().mean() > 0.95


def test_a_zero_head_starts_at_log_c_and_still_reports_how_good_a_fit_would_be():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (100,), generator=generator)
    signal = 3 * torch.nn.functional.one_hot(labels, 8).float() + 0.3 * torch.randn(100, 8, generator=generator)
    fc, report = _fit_head_on(signal, labels, head="zero")
    assert not fc.weight.any() and not fc.bias.any() and report["init"] == "zero"
    assert report["held_out_top1"] > 90 and "residual" not in report


def test_stitch_head_options_on_the_command_line(tmp_path):
    run("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits", "--probe-size", "100", "--head", "zero",
        "--no-recalibrate-norms", "--out", str(tmp_path / "zero"))
    info = json.loads((tmp_path / "zero" / "structure.json").read_text())["info"]["init"]
    assert "recalibrated_norms" not in info and info["fits"][-1]["init"] == "zero"
    assert not load_net(tmp_path / "zero").head.fc.weight.any()
    proc = run("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits", "--init", "default", "--head", "zero",
               "--out", str(tmp_path / "bad"), check_ok=False)
    assert_one_line_error(proc, "--head zero", "--init least-squares")
    proc = run("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits", "--init", "default",
               "--recalibrate-norms", "--out", str(tmp_path / "bad"), check_ok=False)
    assert_one_line_error(proc, "--recalibrate-norms", "--init least-squares")


def test_a_fit_cache_gives_every_network_exactly_its_own_fit(tmp_path):
    """Networks fitted one after another through a FitCache (the search) start from the longest prefix fitted before;
    each must come out as if fitted alone, and the carried images must be the fitted network's pooled features."""
    from reassembly.data import load_dataset, normalize
    from reassembly.stitch.init import FitCache

    train = load_dataset("digits", "train", image_size=32, channels=3, max_per_class=20, seed=0)
    probe, other = train.images[:120], train.images[120:150]
    specs = ["resnet20_cifar5:1-4,resnet20_cifar5:4-6,mobilenetv2_cifar5:7-13",
             "resnet20_cifar5:1-4,resnet20_cifar5:4-6,resnet32_cifar5:10-13",
             "resnet20_cifar5:1-4,vgg11_cifar5:2-3,mobilenetv2_cifar5:7-13",
             "resnet20_cifar5:0-4,resnet20_cifar5:4-6,resnet20_cifar5:6-9"]
    cache = FitCache(probe, other)
    for spec in specs:
        nets = []
        for cached in (True, False):
            blocks = [pretrained_block(*b) for b in parse_blocks(spec)]
            torch.manual_seed(0)
            net = build_network(blocks, num_classes=10)
            report = least_squares_init(net, blocks, probe, train.labels[:120], batch_size=50, progress=False,
                                        cache=cache if cached else None)
            nets.append((net, report))
        (fast, fast_report), (alone, alone_report) = nets
        for (name, a), (_, b) in zip(fast.state_dict().items(), alone.state_dict().items()):
            assert torch.allclose(a.double(), b.double(), atol=1e-5), (spec, name)
        assert [f.get("residual") for f in fast_report["fits"]] == [f.get("residual") for f in alone_report["fits"]]
        with torch.no_grad():
            x = normalize(other, alone.structure.mean, alone.structure.std)
            pooled = alone.head.pool(alone.eval().features(x))
        assert torch.allclose(fast_report["carried"], pooled, atol=1e-4)
    assert len(cache.prefixes) == 3  # only the prefixes of the last network are kept


def test_full_fine_tuning_starts_from_a_zeroed_head_unless_asked(tmp_path):
    """The default of DEFAULT_HEAD_START: full fine-tuning from a zeroed head (frozen training keeps the fitted one),
    recorded with the trained network; the first step's loss is then log C whatever the fit was."""
    from reassembly.stitch.training import RECIPE, train_network

    run("stitch", "--blocks", "resnet20_cifar5:1-4", "--data", "digits", "--probe-size", "100", "--out",
        str(tmp_path / "net"))
    recipe = RECIPE.model_copy(update={"epochs": 1, "flip": False, "lr": 1e-12, "warmup_epochs": 0})
    losses = {}
    for mode, start in (("full", None), ("full", "fitted"), ("frozen", None)):
        out = tmp_path / f"{mode}-{start}"
        train_network(tmp_path / "net", "digits", mode, recipe=recipe, out=out, max_per_class=10, head_start=start,
                      progress=False)
        info = json.loads((out / "structure.json").read_text())["info"]["trained"]
        losses[(mode, start)] = (info["head_start"], info["final"]["train_loss"])
    assert losses[("full", None)][0] == "zero" and losses[("full", "fitted")][0] == "fitted"
    assert losses[("frozen", None)][0] == "fitted"
    assert losses[("full", None)][1] == pytest.approx(2.3026, abs=0.01)  # log 10: nothing learnt at lr 1e-12
    assert abs(losses[("full", "fitted")][1] - 2.3026) > 0.03  # the fitted head says something
