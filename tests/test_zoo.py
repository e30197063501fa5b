import pytest
import torch

from reassembly import create_model, list_models, model_info, save_checkpoint
from reassembly.data import IMAGENET_MEAN, IMAGENET_STD, normalization_of
from reassembly.errors import ReassemblyError, UnknownModelError
from reassembly.measure import count_macs, count_params
from reassembly.zoo.models.mobilenext import SandGlass

ALL = list_models()


def test_registry_lists_every_family():
    families = {model_info(n).family for n in ALL}
    assert {"cifar_resnet", "wide_resnet", "vgg", "mobilenetv2", "mobilenext", "vit"} <= families
    assert list_models("cifar_resnet*") == sorted(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110))


def test_models_carry_the_normalisation_of_their_entry_or_checkpoint(tmp_path):
    model = create_model("cifar_resnet20")
    assert model.input_normalization == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_checkpoint(model, tmp_path / "w.safetensors", metadata={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]})
    loaded = create_model("cifar_resnet20", checkpoint=str(tmp_path / "w.safetensors"))
    assert normalization_of(loaded) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean .*cifar_resnet20"):
        create_model("cifar_resnet2")


def test_timm_prefix_without_timm_names_the_extra():
    try:
        import timm  # noqa: F401
        pytest.skip("timm is importable here")
    except Exception:
        pass
    with pytest.raises(ReassemblyError, match=r"reassembly\[timm\]"):
        create_model("timm:resnet18")


@pytest.mark.parametrize("name", [n for n in ALL if n != "cifar_wrn28_10"] + [pytest.param("cifar_wrn28_10", marks=pytest.mark.slow)])
def test_forward_backward_at_input_size(name):
    info = model_info(name)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, *info.input_size)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


def test_cifar_resnet_param_counts_match_the_paper():
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M
    counts = {d: count_params(create_model(f"cifar_resnet{d}")) for d in (20, 32, 44, 56, 110)}
    assert counts[20] == 269_722 and counts[32] == 464_154
    assert round(counts[56] / 1e6, 2) == 0.85 and round(counts[110] / 1e6, 1) == 1.7


def test_mobilenext_official_counts():
    model = create_model("mobilenext_100")
    assert count_params(model) == 3_535_416
    assert abs(count_macs(model, (3, 224, 224)) / 1e6 - 311.3) < 0.05
    assert count_params(create_model("mobilenext_100", variant="uniform")) == 3_305_720
    expected = {"mobilenext_140": 6_126_168, "mobilenext_075": 2_766_168, "mobilenext_050": 2_152_304,
                "mobilenext_035": 1_913_976}
    assert {n: count_params(create_model(n)) for n in expected} == expected


def test_mobilenetv2_matches_torchvision_counts():
    model = create_model("mobilenetv2_100")
    assert count_params(model) == 3_504_872
    assert abs(count_macs(model, (3, 224, 224)) / 1e6 - 300.8) < 0.05


def test_cifar_pair_counts():
    assert count_params(create_model("cifar_mobilenext_050")) == 628_562
    assert count_params(create_model("cifar_mobilenetv2_050")) == 590_410


def test_mobilenext_block_census_and_output_shape():
    model = create_model("mobilenext_100").eval()
    blocks = [m for m in model.features if isinstance(m, SandGlass)]
    assert len(blocks) == 20
    assert sum(b.use_shortcut for b in blocks) == 12
    with torch.no_grad():
        features = model.features(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, 1280, 7, 7)
    # the first block of each stage: ops per block show the official shapes 1, 4, 3, 3, 2, 3, 2, 4
    firsts = [blocks[i] for i in (0, 1, 2, 5, 8, 12, 16, 19)]
    assert [len(b.conv) for b in firsts] == [4, 4, 3, 3, 2, 3, 2, 4]


def test_partial_identity_matches_in_place_reference():
    block = SandGlass(32, 32, identity_ratio=0.5).eval()
    full = SandGlass(32, 32, identity_ratio=1.0)
    assert count_params(block) == count_params(full)
    x = torch.randn(3, 32, 8, 8)
    with torch.no_grad():
        reference = block.conv(x).clone()
        reference[:, :16] += x[:, :16]
        assert torch.allclose(block(x), reference)
        assert not torch.allclose(block(x), block.conv(x) + x)


def test_sandglass_rejects_impossible_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        SandGlass(16, 32, shortcut=True)
