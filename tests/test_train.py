import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reassembly.checkpoint import read_state_dict
from reassembly.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    normalization_of,
    set_normalization,
)
from reassembly.errors import ReassemblyError
from reassembly.train import TrainRecipe, evaluate, train_classifier
from reassembly.train.loop import warmup_cosine

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_task(n=192, classes=3, seed=0):
    """Class templates plus noise: learnable in a few steps, no download."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (classes, 3, 8, 8), generator=g).float()
    labels = torch.arange(n) % classes
    noise = torch.randn(n, 3, 8, 8, generator=g) * 20
    images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(classes)), "tiny")


def tiny_model(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


RECIPE = TrainRecipe(epochs=3, batch_size=16, lr=0.2, warmup_epochs=0.5, crop_padding=1)


class FrozenStemNet(nn.Module):
    """A frozen stem with batch norm that the model keeps in eval mode when it trains (as a reassembled network keeps
    its frozen blocks), and a trainable head with neither batch norm nor dropout."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).requires_grad_(False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.stem(x))

    def train(self, mode=True):
        super().train(mode)
        self.stem.eval()
        return self


DISTRIBUTED_RECIPE = RECIPE.model_copy(update={"lr": 0.05})  # 192 images: 12 global batches of 16 per epoch


def distributed_case():
    """Model, training set and test set of the two-process test. The test set is sorted by class and of odd size,
    so that no one shard's accuracy is the whole set's."""
    data = tiny_task()
    return FrozenStemNet(), data, data.subset(data.labels.argsort(stable=True)[1:])


def test_training_learns_and_writes_artifacts(tmp_path):
    data = tiny_task()
    summary = train_classifier(tiny_model(), data, data, RECIPE, tmp_path / "run", seed=1, progress=False,
                               metadata={"command": "python train.py --seed 1"})
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert summary["final"]["test_top1"] > 60  # chance is 33%
    _, meta = read_state_dict(tmp_path / "run" / "final.safetensors")
    assert meta["epochs"] == 3 and meta["seed"] == 1 and meta["command"] == "python train.py --seed 1"
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    for line in [f"| final test top-1 | **{summary['final']['test_top1']:.2f} %** |", "| epochs, seed | 3, 1 |",
                 "| command | `python train.py --seed 1` |", "- `lr`: 0.2", "| model | `Sequential`, 267 parameters",
                 "| trained on | `tiny`: 192 images 3x8x8, 3 classes (c0, c1, c2) |",
                 *(f"| {e['epoch']} | {e['train_loss']:.4f} | {e['train_top1']:.2f} | {e['test_top1']:.2f} |"
                   for e in log)]:
        assert line in card, line


def test_a_frozen_part_is_counted_on_the_card_and_does_not_move(tmp_path):
    model = tiny_model()
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    train_classifier(model, tiny_task(), None, RECIPE, tmp_path / "run", progress=False)
    assert torch.equal(model[0].weight, before)
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert "267 parameters (43 trained)" in card and "| final test top-1 | not measured |" in card


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    data = tiny_task()
    train_classifier(tiny_model(), data, None, RECIPE, tmp_path / "straight", seed=2, progress=False)
    partial = train_classifier(tiny_model(), data, None, RECIPE, tmp_path / "split", seed=2, progress=False,
                               stop_after=1)
    assert partial["epochs"] == 1 and not (tmp_path / "split" / "final.safetensors").exists()
    train_classifier(tiny_model(), data, None, RECIPE, tmp_path / "split", seed=2, progress=False)
    a, _ = read_state_dict(tmp_path / "straight" / "final.safetensors")
    b, _ = read_state_dict(tmp_path / "split" / "final.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_directory_refuses_another_recipe(tmp_path):
    data = tiny_task()
    train_classifier(tiny_model(), data, None, RECIPE, tmp_path / "run", seed=0, progress=False, stop_after=1)
    with pytest.raises(ReassemblyError, match="another recipe or seed"):
        train_classifier(tiny_model(), data, None, RECIPE, tmp_path / "run", seed=5, progress=False)


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_channels_last_trains_to_the_same_model_up_to_rounding(tmp_path):
    def no_dropout():  # dropout draws its masks in memory order, so only a dropout-free model can match exactly
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 3))

    data = tiny_task()  # not seed 3: its data order brings a pre-activation within rounding of zero (-1.4e-6 at
    # step 20), the two layouts take different sides of the ReLU, and the runs part by 1e-3
    train_classifier(no_dropout(), data, None, RECIPE, tmp_path / "nchw", seed=4, progress=False)
    train_classifier(no_dropout(), data, None, RECIPE, tmp_path / "nhwc", seed=4, progress=False, channels_last=True)
    a, _ = read_state_dict(tmp_path / "nchw" / "final.safetensors")
    b, _ = read_state_dict(tmp_path / "nhwc" / "final.safetensors")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-3), key


def test_a_run_directory_in_use_is_refused(tmp_path):
    import fcntl

    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(ReassemblyError, match="being trained by another process"):
            train_classifier(tiny_model(), tiny_task(), None, RECIPE, tmp_path / "run", progress=False)


def test_divergence_is_reported_before_a_step(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))
    with pytest.raises(ReassemblyError, match="diverged at epoch 1"):
        train_classifier(model, tiny_task(), None, RECIPE, tmp_path / "run", progress=False)


def test_bf16_mixed_precision_learns_and_keeps_float32_weights(tmp_path):
    data = tiny_task()
    recipe = RECIPE.model_copy(update={"mixed_precision": "bf16"})
    summary = train_classifier(tiny_model(), data, data, recipe, tmp_path / "bf16", seed=1, progress=False)
    assert summary["final"]["test_top1"] > 60  # chance is 33%
    weights, meta = read_state_dict(tmp_path / "bf16" / "final.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert meta["recipe"]["mixed_precision"] == "bf16"
    fp32 = train_classifier(tiny_model(), data, None, RECIPE, tmp_path / "fp32", seed=1, progress=False)
    reference, _ = read_state_dict(tmp_path / "fp32" / "final.safetensors")
    assert not all(torch.equal(weights[k], reference[k]) for k in reference)  # autocast really ran in bfloat16
    assert fp32["recipe"]["mixed_precision"] == "no"


def test_a_run_started_before_a_recipe_field_existed_still_resumes(tmp_path):
    data = tiny_task()
    run = tmp_path / "run"
    train_classifier(tiny_model(), data, None, RECIPE, run, seed=0, progress=False, stop_after=1)
    saved = json.loads((run / "recipe.json").read_text())
    del saved["recipe"]["mixed_precision"]  # as written by a version without that field
    (run / "recipe.json").write_text(json.dumps(saved))
    summary = train_classifier(tiny_model(), data, None, RECIPE, run, seed=0, progress=False)
    assert summary["epochs"] == RECIPE.epochs


def imported_modules(module: str) -> set[str]:
    """The reassembly modules that importing ``module`` and calling its functions can import: every import
    statement, at the top or inside a function, followed transitively, with the packages holding each module (the
    top-level package, which gathers the public API, excepted)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name == "reassembly":
            continue
        seen.add(name)
        path = SRC / name.replace(".", "/")
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not file.is_file():  # a name imported from a module
            seen.discard(name)
            continue
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        todo.append(name.rpartition(".")[0])
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                todo += [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
        todo = [t for t in todo if t.startswith("reassembly.")]
    return seen


def test_train_imports_nothing_from_the_zoo():
    needed = imported_modules("reassembly.train")
    assert {"reassembly.train.evaluate", "reassembly.train.loop", "reassembly.data.transforms"} <= needed
    assert not [m for m in needed if m.split(".")[:2] == ["reassembly", "zoo"]]
    assert "reassembly.zoo.registry" in imported_modules("reassembly.similarity.stage")  # the walk does see the zoo


def test_a_model_carries_its_normalisation():
    model = tiny_model()
    assert normalization_of(model) == (IMAGENET_MEAN, IMAGENET_STD)  # any module: ImageNet's unless it says
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # as timm models carry it
    assert normalization_of(model) == ((0.5,) * 3, (0.5,) * 3)
    set_normalization(model, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert normalization_of(model) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert normalization_of(model, {"mean": [0, 0, 0], "std": [1, 1, 1]}) == ((0, 0, 0), (1, 1, 1))  # checkpoint's


def test_training_and_evaluation_use_the_models_normalisation(tmp_path):
    data, mean, std = tiny_task(), (0.2, 0.3, 0.4), (0.1, 0.2, 0.3)
    model = set_normalization(tiny_model(), mean, std)
    train_classifier(model, data, None, RECIPE.model_copy(update={"epochs": 1}), tmp_path / "run", progress=False)
    _, meta = read_state_dict(tmp_path / "run" / "final.safetensors")
    assert (tuple(meta["mean"]), tuple(meta["std"])) == (mean, std)
    own = evaluate(model, data, progress=False)
    assert own == evaluate(model, data, mean, std, progress=False)
    assert own != evaluate(model, data, IMAGENET_MEAN, IMAGENET_STD, progress=False)
    with pytest.raises(ReassemblyError, match="both mean and std"):
        evaluate(model, data, mean=mean, progress=False)


def test_explicit_normalisation_is_recorded_on_the_model(tmp_path):
    model, mean, std = tiny_model(), (0.2, 0.3, 0.4), (0.1, 0.2, 0.3)
    train_classifier(model, tiny_task(), None, RECIPE.model_copy(update={"epochs": 1}), tmp_path / "run",
                     mean=mean, std=std, progress=False)
    assert normalization_of(model) == (mean, std)


def test_two_processes_train_as_one_process_with_the_same_global_batch(tmp_path):
    """``torchrun --nproc_per_node 2`` on this CPU (DDP over gloo) gives the weights, log and test accuracy of one
    process at the same global batch, to float tolerance, and both processes end with identical weights; stopped
    after one epoch and resumed, too. Augmentation is on (drawn for the whole batch); the model has no dropout and
    no batch norm in train mode, whose masks and batch statistics are per process and legitimately differ from one
    process's. Its frozen stem (batch norm included, kept in eval mode by the model's own train()) must not move.
    A second model, with batch norm in train mode, must still end the same on both processes, and its logged test
    accuracy be that of the saved weights."""
    model, data, test_set = distributed_case()
    assert len(data) % DISTRIBUTED_RECIPE.batch_size == 0  # no last batch for the processes to complete
    single = train_classifier(model, data, test_set, DISTRIBUTED_RECIPE, tmp_path / "one" / "run", seed=4,
                              progress=False)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(Path(__file__).with_name("train_worker.py")), str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stop_after in (["1"], []):
        done = subprocess.run(launch + stop_after, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = [read_state_dict(tmp_path / "two" / f"run-rank-{r}.safetensors")[0] for r in (0, 1)]
    one, _ = read_state_dict(tmp_path / "one" / "run" / "final.safetensors")
    two, meta = read_state_dict(tmp_path / "two" / "run" / "final.safetensors")
    initial = FrozenStemNet().state_dict()
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]) and torch.equal(ranks[0][key], two[key]), key
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
        if key.startswith("stem."):
            assert torch.equal(two[key], initial[key]), key
        else:
            assert not torch.equal(two[key], initial[key]), key
    logs = [[json.loads(line) for line in (tmp_path / name / "run" / "log.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert [e["epoch"] for e in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert a["lr"] == pytest.approx(b["lr"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert (a["train_top1"], a["test_top1"]) == (b["train_top1"], b["test_top1"])  # full test set, both
    assert meta["final"] == json.loads(json.dumps(logs[1][-1])) and single["epochs"] == meta["epochs"]
    assert sorted(p.name for p in (tmp_path / "two" / "run").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "run").iterdir())
    norm = [read_state_dict(tmp_path / "two" / f"norm-rank-{r}.safetensors")[0] for r in (0, 1)]
    saved, meta = read_state_dict(tmp_path / "two" / "norm" / "final.safetensors")
    for key in saved:
        assert torch.equal(norm[0][key], norm[1][key]) and torch.equal(norm[0][key], saved[key]), key
    with_norm = tiny_model()
    with_norm.load_state_dict(saved)
    assert evaluate(with_norm, test_set, progress=False).top1 == meta["final"]["test_top1"]
