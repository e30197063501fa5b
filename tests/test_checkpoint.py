import pickle

import pytest
import torch

from reassembly import create_model, load_into, read_state_dict, save_checkpoint
from reassembly.errors import CheckpointError

from .conftest import AKAMASTER, needs_akamaster


def test_safetensors_round_trip_keeps_metadata(tmp_path):
    model = create_model("cifar_resnet20")
    path = save_checkpoint(model, tmp_path / "w.safetensors", metadata={"classes": ["a", "b"], "epochs": 3})
    state, meta = read_state_dict(path)
    assert meta == {"classes": ["a", "b"], "epochs": 3}
    other = create_model("cifar_resnet20")
    load_into(other, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left behind


def test_half_precision_save(tmp_path):
    path = save_checkpoint(create_model("cifar_resnet20"), tmp_path / "w.safetensors", dtype=torch.float16)
    state, _ = read_state_dict(path)
    assert state["conv1.weight"].dtype == torch.float16


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"w": _RunsCode(marker)}}, handle)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        read_state_dict(tmp_path / "w.npz")


def test_wrong_number_of_classes_names_both(tmp_path):
    path = save_checkpoint(create_model("cifar_resnet20", num_classes=10), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="trained for 10 classes but model cifar_resnet20 was built with 5"):
        create_model("cifar_resnet20", num_classes=5, checkpoint=str(path))


def test_wrong_architecture_is_named(tmp_path):
    path = save_checkpoint(create_model("cifar_resnet20"), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="does not fit model cifar_resnet32"):
        create_model("cifar_resnet32", checkpoint=str(path))


def test_wrapped_and_prefixed_torch_file(tmp_path):
    model = create_model("cifar_resnet20")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 90.0}, path)
    state, meta = read_state_dict(path)
    assert meta == {"best_prec1": 90.0}
    assert set(state) == set(model.state_dict())


@needs_akamaster
def test_third_party_resnets_load():
    for depth, name in ((20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th")):
        meta = load_into(create_model(f"cifar_resnet{depth}"), AKAMASTER / name)
        assert meta["best_prec1"] > 90
