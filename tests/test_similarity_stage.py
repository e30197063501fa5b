"""The similarity stage on small synthetic zoos, the feature taps it reads through, and the CLI on the shipped zoo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from reassembly.data import ImageDataset, normalize
from reassembly.errors import ReassemblyError
from reassembly.graph import dissect
from reassembly.graph import tap
from reassembly.similarity import ZooMember, compute_similarity, linear_cka, load_similarity
from reassembly.similarity.stage import batch_bounds
from reassembly.zoo import create_model

from .conftest import needs_cifar
from .test_cli import assert_one_line_error

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def small_cnn(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    block = lambda c_in, c_out, stride: nn.Sequential(  # noqa: E731
        nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU()
    )
    model = nn.Sequential(
        block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5),
    )
    return model.eval()


def probe_images(n: int = 96, seed: int = 0, size: int = 16) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    return ImageDataset(images, torch.zeros(n, dtype=torch.long), ("probe",), "random")


def zoo(*seeds: int, size: int = 16) -> list[ZooMember]:
    return [ZooMember(f"cnn{seed}", small_cnn(seed, 8 + 4 * (seed % 2)), MEAN, STD, (3, size, size)) for seed in seeds]


def run(members, probe, out, **options):
    return compute_similarity(members, probe, out, progress=False, heatmaps=False, batch_size=32, **options)


def test_taps_give_every_boundary_of_one_forward_pass():
    model = create_model("cifar_resnet20").eval()
    chain = dissect(model, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        raw = tap(chain, x, pool=False)
        pooled = tap(chain, x, points=[0, 3, len(chain)])
        expected = model(x)
    assert sorted(raw) == list(range(len(chain) + 1))
    torch.testing.assert_close(raw[len(chain)], expected)
    torch.testing.assert_close(raw[0], x)
    for node in chain:
        assert tuple(raw[node.index + 1].shape[1:]) == node.out_shape
    assert sorted(pooled) == [0, 3, len(chain)]
    torch.testing.assert_close(pooled[3], raw[3].mean(dim=(2, 3)))


def test_taps_pool_tokens_by_mean_or_class_token():
    model = create_model("cifar_vit_tiny").eval()
    chain = dissect(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = tap(chain, x, points=[2], pool=False)[2]
        torch.testing.assert_close(tap(chain, x, points=[2])[2], raw.mean(1))
        torch.testing.assert_close(tap(chain, x, points=[2], token_pool="cls")[2], raw[:, 0])


def test_stage_matrices_equal_full_batch_cka_of_the_tapped_features(tmp_path):
    members, probe = zoo(0, 1, 2), probe_images()
    result = run(members, probe, tmp_path / "sim", estimator="exact")
    assert (tmp_path / "sim" / "similarity.json").is_file()
    loaded = load_similarity(tmp_path / "sim")
    assert loaded.models == ["cnn0", "cnn1", "cnn2"] and len(loaded.index["pairs"]) == 3
    features = {}  # tapped with the stage's batches: float32 convolutions round differently at other batch sizes
    for member in members:
        chain = dissect(member.model, member.input_size)
        with torch.no_grad():
            batches = [tap(chain, normalize(probe.images[a:b], MEAN, STD)) for a, b in batch_bounds(len(probe), 32)]
        features[member.name] = {p: torch.cat([batch[p] for batch in batches]) for p in batches[0]}
    for debiased in (False, True):
        points = loaded.points("cnn2", "cnn0", debiased)
        expected = np.array([[linear_cka(x, y, debiased) for y in features["cnn0"].values()]
                             for x in features["cnn2"].values()])
        np.testing.assert_allclose(points, expected, atol=1e-9)
    path, _ = result.pair_file("cnn0", "cnn1")
    with np.load(path) as arrays:
        np.testing.assert_array_equal(arrays["input"], arrays["points_debiased"][:-1, :-1])
        np.testing.assert_array_equal(arrays["output"], arrays["points_debiased"][1:, 1:])
        assert arrays["input"].shape == (len(loaded.chain("cnn0")["nodes"]), len(loaded.chain("cnn1")["nodes"]))


def test_copies_of_one_model_are_identical_at_every_point(tmp_path):
    members = zoo(3, 3)
    members[1].name = "copy"
    run(members, probe_images(), tmp_path / "sim")
    points = load_similarity(tmp_path / "sim").points("cnn3", "copy")
    np.testing.assert_allclose(np.diag(points), 1.0, atol=1e-9)


@pytest.mark.parametrize("estimator", ["exact", "minibatch"])
def test_an_interrupted_run_resumes_to_the_same_matrices(tmp_path, estimator):
    members, probe = zoo(0, 1), probe_images(n=160)
    assert run(members, probe, tmp_path / "part", estimator=estimator, stop_after=2) is None
    assert not (tmp_path / "part" / "similarity.json").exists()
    assert (tmp_path / "part" / "progress").is_dir()
    resumed = run(members, probe, tmp_path / "part", estimator=estimator)
    straight = run(members, probe, tmp_path / "whole", estimator=estimator)
    assert not (tmp_path / "part" / "progress").exists()
    for debiased in (False, True):
        np.testing.assert_array_equal(resumed.points("cnn0", "cnn1", debiased), straight.points("cnn0", "cnn1", debiased))


def test_ctrl_c_keeps_the_batches_done_and_the_rerun_gives_the_same_matrices(tmp_path, monkeypatch):
    import signal

    import reassembly.similarity.stage as stage

    members, probe = zoo(0, 1), probe_images(n=160)
    features, calls = stage._features, []

    def ctrl_c_in_the_third_batch(*args, **kwargs):  # a real SIGINT, delivered while a batch is being computed
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return features(*args, **kwargs)

    monkeypatch.setattr(stage, "_features", ctrl_c_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(members, probe, tmp_path / "part")
    monkeypatch.setattr(stage, "_features", features)
    with np.load(tmp_path / "part" / "progress" / "rank-0-of-1.npz") as saved:
        assert int(saved["__batches_done__"]) == 2  # batch 0 (the reference) and batch 1 were whole
    assert not (tmp_path / "part" / "similarity.json").exists()
    resumed, straight = run(members, probe, tmp_path / "part"), run(members, probe, tmp_path / "whole")
    for debiased in (False, True):
        np.testing.assert_array_equal(resumed.points("cnn0", "cnn1", debiased), straight.points("cnn0", "cnn1", debiased))


def test_resuming_with_other_settings_is_refused(tmp_path):
    members, probe = zoo(0, 1), probe_images(n=160)
    run(members, probe, tmp_path / "sim", stop_after=1)
    with pytest.raises(ReassemblyError, match="unfinished similarity run with other settings"):
        run(members, probe, tmp_path / "sim", token_pool="cls")
    run(members, probe, tmp_path / "sim")
    with pytest.raises(ReassemblyError, match="finished similarity run with other settings"):
        run(members, probe, tmp_path / "sim", estimator="exact")


def test_bad_zoos_and_probe_sets_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "sim"
    with pytest.raises(ReassemblyError, match="at least 4"):
        run(zoo(0, 1), probe_images(n=3), out)
    with pytest.raises(ReassemblyError, match="at least two"):
        run(zoo(0), probe_images(), out)
    with pytest.raises(ReassemblyError, match="twice"):
        run(zoo(0, 0), probe_images(), out)
    with pytest.raises(ReassemblyError, match=r"cnn0 takes inputs of size \(3, 16, 16\)"):
        run(zoo(0, 1), probe_images(size=20), out)
    with pytest.raises(ReassemblyError, match="fails on an input of size"):
        run([ZooMember("vit", create_model("cifar_vit_tiny"), MEAN, STD, (3, 16, 16)), *zoo(0, size=16)],
            probe_images(), out)
    assert not out.exists()


def cli(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "reassembly", *args] if launcher else [sys.executable, "-m", "reassembly", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@needs_cifar
def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "sim"
    cases = [
        (["--zoo", "resnet20_cifar5,no_such_model", "--data", "cifar10[0:5]"], "no shipped model named no_such_model"),
        (["--zoo", "resnet20_cifar5,vit_cifar5", "--data", "cifar10[0:5]", "--probe-size", "0"], "'--probe-size'"),
        (["--zoo", "resnet20_cifar5,vit_cifar5", "--data", "cifar10[0:5]", "--probe-size", "3"], "at least 4"),
        (["--zoo", "resnet20_cifar5,vit_cifar5", "--data", "cifar10[0:5]", "--image-size", "24",
          "--probe-size", "8"], "vit_cifar5 fails on an input of size (3, 24, 24)"),
    ]
    for args, message in cases:
        assert_one_line_error(cli("similarity", *args, "--out", str(out)), message)
        assert not out.exists()


@needs_cifar
@pytest.mark.parametrize("estimator", ["minibatch", "exact"])
def test_two_processes_give_the_same_matrices_as_one(tmp_path, estimator):
    args = ["similarity", "--zoo", "resnet20_cifar5,vit_cifar5", "--data", "cifar10[0:5]", "--probe-size", "200",
            "--batch-size", "50", "--no-heatmaps", "--estimator", estimator]
    single = cli(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517")
    double = cli(*args, "--out", str(tmp_path / "two"), launcher=torchrun)
    assert double.returncode == 0, double.stderr
    one, two = load_similarity(tmp_path / "one"), load_similarity(tmp_path / "two")
    assert one.index["samples"] == two.index["samples"] == 200
    assert (one.index["processes"], two.index["processes"]) == (1, 2)  # the probe set really was split
    for debiased in (False, True):
        np.testing.assert_allclose(two.points("resnet20_cifar5", "vit_cifar5", debiased),
                                   one.points("resnet20_cifar5", "vit_cifar5", debiased), atol=1e-8, rtol=0)
    assert json.loads((tmp_path / "two" / "similarity.json").read_text())["settings"] == one.index["settings"]
