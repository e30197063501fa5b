"""The partition stage on real similarity runs: copies of one model, determinism, the CLI pair on the shipped zoo."""

from __future__ import annotations

import json

import pytest
import torch

from reassembly.partition import PartitionError, partition_zoo
from reassembly.similarity import ZooMember, compute_similarity
from reassembly.zoo import create_model

from .conftest import needs_cifar
from .test_cli import assert_one_line_error
from .test_similarity_stage import MEAN, STD, cli, probe_images


def resnet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cifar_resnet20", num_classes=5).eval()


@pytest.fixture(scope="module")
def copies_run(tmp_path_factory):
    """Similarity of three copies of one ResNet-20 and one other ResNet-20, on random probe images."""
    out = tmp_path_factory.mktemp("copies") / "sim"
    model = resnet(0)
    zoo = [ZooMember(f"copy{i}", model, MEAN, STD, (3, 32, 32)) for i in range(3)]
    zoo.append(ZooMember("other", resnet(1), MEAN, STD, (3, 32, 32)))
    compute_similarity(zoo, probe_images(n=128, size=32), out, batch_size=64, progress=False, heatmaps=False)
    return out


@pytest.mark.parametrize("k", [3, 4])
def test_copies_of_one_model_partition_identically(copies_run, tmp_path, k):
    record = partition_zoo(copies_run, k=k, out=tmp_path / "partition.json", restarts=20, plot=False)
    blocks = {model["name"]: [(b["start"], b["stop"]) for b in model["blocks"]] for model in record["models"]}
    assert blocks["copy0"] == blocks["copy1"] == blocks["copy2"]
    assert len(blocks["copy0"]) == k
    assert blocks["copy0"][0][0] == 1 and blocks["copy0"][-1][1] == 10  # the body of ResNet-20: nodes 1..9


def test_the_same_seed_gives_the_same_partition_and_the_record_describes_every_block(copies_run, tmp_path):
    first = partition_zoo(copies_run, k=4, out=tmp_path / "a.json", seed=3, restarts=10)
    second = partition_zoo(copies_run, k=4, out=tmp_path / "b.json", seed=3, restarts=10)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert (tmp_path / "a.png").is_file()
    assert first == second == json.loads((tmp_path / "a.json").read_text())
    block = first["models"][0]["blocks"][1]
    assert block["spec"] == f"copy0:{block['start']}-{block['stop']}"
    assert block["in_shape"] is not None and block["out_shape"] is not None and block["macs"] > 0
    assert len(block["nodes"]) == block["stop"] - block["start"]
    members = [(m["model"], m["stage"]) for m in first["sets"][1]["members"]]
    assert members == [(name, 1) for name in ("copy0", "copy1", "copy2", "other")]


def test_k_larger_than_the_shortest_body_is_refused_and_writes_nothing(copies_run, tmp_path):
    with pytest.raises(PartitionError, match="has only 9 body nodes"):
        partition_zoo(copies_run, k=10, out=tmp_path / "p.json")
    assert_one_line_error(cli("partition", str(copies_run), "--k", "10", "--out", str(tmp_path / "p.json")),
                          "has only 9 body nodes")
    assert not list(tmp_path.iterdir())
    assert_one_line_error(cli("partition", str(tmp_path / "nowhere")), "run `reassembly similarity")


@needs_cifar
def test_cli_pair_runs_end_to_end_on_the_split_cifar_zoo(tmp_path):
    out = tmp_path / "sim"
    similarity = cli("similarity", "--zoo", "split-cifar", "--data", "cifar10[0:5]", "--probe-size", "64",
                     "--batch-size", "32", "--out", str(out), "--no-heatmaps")
    assert similarity.returncode == 0, similarity.stderr
    index = json.loads((out / "similarity.json").read_text())
    assert len(index["models"]) == 8 and len(index["pairs"]) == 28
    partition = cli("partition", str(out), "--k", "4", "--restarts", "10")
    assert partition.returncode == 0, partition.stderr
    record = json.loads((out / "partition.json").read_text())
    assert (out / "partition.png").is_file()
    assert {model["name"] for model in record["models"]} == {model["name"] for model in index["models"]}
    assert all(len(model["blocks"]) == 4 for model in record["models"])
    assert "vgg11_fashion" in partition.stdout
    random = cli("partition", str(out), "--k", "4", "--random", "--seed", "3", "--out", str(tmp_path / "random.json"))
    assert random.returncode == 0, random.stderr
    drawn = json.loads((tmp_path / "random.json").read_text())
    assert drawn["config"]["iterations"] == 0 and drawn["restarts"]["iterations"] == [0] and "one random partition" in \
        random.stdout
    assert drawn["score"] < record["score"]
