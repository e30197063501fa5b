"""The shipped zoo: files, hashes, sizes, and accuracies re-measured on the fixed subset recorded in the manifest."""

import shutil

import pytest

from reassembly import create_model
from reassembly.data import data_roots
from reassembly.errors import CheckpointError, UnknownModelError
from reassembly.train import evaluate
from reassembly.zoo import pretrained
from reassembly.zoo.recipes import ZOO_RECIPES
from reassembly.zoo.training import check_subset, zoo_split

ENTRIES = pretrained.load_manifest()
NAMES = [e.name for e in ENTRIES] or [pytest.param("none", marks=pytest.mark.skip(reason="no weights shipped yet"))]


def shipped_model_and_test_split(name):
    """The test split of a shipped model's source task and a function evaluating the shipped model on a part of it;
    skips the test when the dataset is not on this machine."""
    zoo = ZOO_RECIPES[name]
    try:
        test_set = zoo_split(zoo, "test")
    except Exception as exc:  # the dataset is not on this machine
        pytest.skip(f"{zoo.data} not available ({exc}; looked in {data_roots()})")
    model = create_model(name, pretrained=True)
    return test_set, lambda images: evaluate(model, images, progress=False)  # with the normalisation it carries


def test_shipped_weights_stay_small_and_match_their_hashes():
    total = 0
    for entry in ENTRIES:
        path = pretrained.WEIGHTS_DIR / entry.file
        assert path.is_file(), entry.name
        assert pretrained.sha256_of(path) == entry.sha256, entry.name
        assert entry.name in ZOO_RECIPES and (pretrained.WEIGHTS_DIR / "cards" / f"{entry.name}.md").is_file()
        total += path.stat().st_size
    assert total < 30 * 2**20


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_reproduces_its_recorded_subset_accuracy(name):
    entry = pretrained.manifest_entry(name)
    test_set, accuracy_of = shipped_model_and_test_split(name)
    subset = check_subset(test_set, ZOO_RECIPES[name].check_images)
    assert len(subset) == entry.subset_check["images"]
    result = accuracy_of(subset)
    assert abs(result.top1 - entry.subset_check["top1"]) <= 100 / len(subset) + 1e-9  # at most one image differs


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    if not ENTRIES:
        pytest.skip("no weights shipped yet")
    entry = ENTRIES[0]
    shutil.copytree(pretrained.WEIGHTS_DIR, tmp_path / "weights")
    data = bytearray((tmp_path / "weights" / entry.file).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "weights" / entry.file).write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(CheckpointError, match="sha256"):
        create_model(entry.name, pretrained=True)


def test_unknown_pretrained_name():
    with pytest.raises(UnknownModelError, match="no pretrained weights named"):
        create_model("resnet20_imagenet21k", pretrained=True)


def test_sandglass_pair_is_matched_in_cost_and_recipe():
    from reassembly.measure import count_macs, count_params

    pair = [ZOO_RECIPES["mobilenext_cifar5"], ZOO_RECIPES["mobilenetv2_cifar5"]]
    assert pair[0].recipe == pair[1].recipe and pair[0].seed == pair[1].seed and pair[0].data == pair[1].data
    models = [create_model(z.architecture, num_classes=5, **z.model_kwargs) for z in pair]
    params = [count_params(m) for m in models]
    macs = [count_macs(m, (3, 32, 32)) for m in models]
    assert abs(params[0] / params[1] - 1) < 0.05 and abs(macs[0] / macs[1] - 1) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_meets_its_target(name):
    target = ZOO_RECIPES[name].target_top1
    if target is None:
        pytest.skip(f"{name} has no accuracy target")
    assert pretrained.manifest_entry(name).test_accuracy >= target


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_reproduces_its_full_test_accuracy(name):
    test_set, accuracy_of = shipped_model_and_test_split(name)
    result = accuracy_of(test_set)
    assert result.top1 == pytest.approx(pretrained.manifest_entry(name).test_accuracy, abs=0.01)


@pytest.mark.parametrize("name", ["resnet20_fashion", "vgg11_cifar5", "vit_cifar5"])
def test_another_class_count_gets_a_new_head_and_keeps_every_other_weight(name):
    import torch

    source = create_model(name, pretrained=True)
    torch.manual_seed(0)
    transfer = create_model(name, pretrained=True, num_classes=3)
    old, new = source.state_dict(), transfer.state_dict()
    changed = sorted(key for key in old if old[key].shape != new[key].shape)
    assert len(changed) in (1, 2) and all(new[key].shape[0] == 3 for key in changed)  # the classifier's weight, bias
    assert all(torch.equal(old[key], new[key]) for key in old if key not in changed)
    assert transfer.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert transfer.input_normalization == source.input_normalization


def test_a_class_count_below_one_is_refused():
    with pytest.raises(CheckpointError, match="at least one class"):
        create_model("resnet20_cifar5", pretrained=True, num_classes=0)
