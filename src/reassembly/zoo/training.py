"""Train a zoo recipe and ship its weights: fp16 safetensors in the package, a manifest entry and a model card."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_into, read_state_dict, save_checkpoint
from ..data import load_dataset, normalization_of
from ..errors import ReassemblyError
from ..io import locked, write_text
from ..measure import count_macs, count_params
from ..train import TrainRecipe, evaluate, train_classifier
from ..train.card import log_table, read_log, recipe_list
from ..train.processes import join_processes
from .pretrained import MANIFEST, WEIGHTS_DIR, load_manifest, sha256_of
from .recipes import ZOO_RECIPES, ZooRecipe
from .registry import create_model


def recipe_for(name: str) -> ZooRecipe:
    if name not in ZOO_RECIPES:
        from ..errors import did_you_mean

        raise ReassemblyError(f"no zoo recipe named {name!r}{did_you_mean(name, ZOO_RECIPES)} (the recipes: "
                              f"{', '.join(ZOO_RECIPES)})")
    return ZOO_RECIPES[name]


def zoo_split(zoo: ZooRecipe, split: str, data_root=None):
    """One split of a zoo model's source data, read the way the model is trained on it."""
    return load_dataset(zoo.data, split, root=data_root, image_size=zoo.image_size, channels=zoo.channels)


def check_subset(test_set, size: int):
    """A fixed, class-balanced-by-stride subset of the test split (test splits here are stored class by class)."""
    stride = max(1, len(test_set) // size)
    return test_set.subset(range(0, stride * size, stride))


def train_zoo_model(name: str, out: str | Path = "runs/zoo", data_root=None, epochs: int | None = None,
                    progress: bool = True) -> Path:
    """Train (or resume) one zoo model; returns its run directory."""
    zoo = recipe_for(name)
    recipe: TrainRecipe = zoo.recipe if epochs is None else zoo.recipe.model_copy(update={"epochs": epochs})
    train_set, test_set = zoo_split(zoo, "train", data_root), zoo_split(zoo, "test", data_root)
    torch.manual_seed(zoo.seed)
    model = create_model(zoo.architecture, num_classes=train_set.num_classes, **zoo.model_kwargs)
    run_dir = Path(out) / name
    train_classifier(model, train_set, test_set, recipe, run_dir, seed=zoo.seed,
                     metadata={"zoo_name": name, "architecture": zoo.architecture, "data": zoo.data,
                               "command": reproduce_command(name, recipe.epochs)},
                     progress=progress, channels_last=zoo.channels_last)
    return run_dir


def ship_zoo_model(name: str, run_dir: str | Path, data_root=None) -> dict:
    """Copy a finished run into the package as fp16 weights and record it in the manifest with a model card.

    Accuracies are measured on the shipped (fp16) weights, as users will load them. Launched on several processes
    (as `reassembly zoo train` may be), they share the evaluation and the main process writes the files.
    """
    processes = join_processes()
    zoo = recipe_for(name)
    run_dir = Path(run_dir)
    final = run_dir / "final.safetensors"
    if not final.is_file():
        raise ReassemblyError(f"{run_dir} has no final.safetensors: finish training first (`reassembly zoo train {name}`)")
    summary = json.loads((run_dir / "summary.json").read_text())
    test_set = zoo_split(zoo, "test", data_root)  # shipping evaluates only; the train split is not needed
    model = create_model(zoo.architecture, num_classes=test_set.num_classes, **zoo.model_kwargs)
    mean, std = normalization_of(model, load_into(model, final))
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    metadata = {"name": name, "architecture": zoo.architecture, "data": zoo.data, "classes": list(test_set.classes),
                "mean": list(mean), "std": list(std)}
    # safetensors orders metadata at random: rewrite only on change
    if processes.is_main_process and not _already_shipped(weights, model, metadata):
        save_checkpoint(model, weights, dtype=torch.float16, metadata=metadata)
    processes.wait_for_everyone()
    load_into(model, weights)  # evaluate exactly what ships
    full = evaluate(model, test_set, mean, std, device=processes.device, progress=False)
    subset = check_subset(test_set, zoo.check_images)
    sub = evaluate(model, subset, mean, std, device=processes.device, progress=False)
    entry = {
        "name": name, "architecture": zoo.architecture, "num_classes": test_set.num_classes,
        "source_data": zoo.data, "classes": list(test_set.classes), "image_size": zoo.image_size,
        "channels": zoo.channels, "recipe": summary["recipe"], "epochs": summary["epochs"], "seed": summary["seed"],
        "test_accuracy": round(full.top1, 2), "params": count_params(model),
        "macs": count_macs(model, (zoo.channels, zoo.image_size, zoo.image_size)), "file": weights.name,
        "sha256": sha256_of(weights), "model_kwargs": zoo.model_kwargs,
        "subset_check": {"images": len(subset), "stride": len(test_set) // zoo.check_images, "top1": sub.top1},
        "command": reproduce_command(name, summary["epochs"]), "channels_last": zoo.channels_last,
    }
    if not processes.is_main_process:
        return entry
    with locked(MANIFEST):  # several training queues may ship at once
        entries = [e.__dict__ for e in load_manifest() if e.name != name] + [entry]
        entries.sort(key=lambda e: list(ZOO_RECIPES).index(e["name"]) if e["name"] in ZOO_RECIPES else 99)
        write_text(MANIFEST, json.dumps({"models": entries}, indent=1) + "\n")
    write_text(WEIGHTS_DIR / "cards" / f"{name}.md", model_card(zoo, entry, run_dir))
    return entry


def _already_shipped(path: Path, model: torch.nn.Module, metadata: dict) -> bool:
    if not path.is_file():
        return False
    shipped, shipped_metadata = read_state_dict(path)
    state = model.state_dict()
    return shipped_metadata == metadata and shipped.keys() == state.keys() and all(
        torch.equal(shipped[k], v.half() if v.is_floating_point() else v) for k, v in state.items()
    )


def model_card(zoo: ZooRecipe, entry: dict, run_dir: Path) -> str:
    """A short model card generated from the manifest entry and the training log."""
    return f"""# {entry['name']}

{zoo.description}

| | |
|---|---|
| architecture | `{entry['architecture']}` {entry['model_kwargs'] or ''} |
| trained on | `{entry['source_data']}` train split, {entry['image_size']}x{entry['image_size']}, {entry['channels']} channels |
| classes | {', '.join(entry['classes'])} |
| test top-1 (shipped fp16 weights) | **{entry['test_accuracy']:.2f} %** on the full `{entry['source_data']}` test split |
| parameters | {entry['params']:,} |
| MACs (one image) | {entry['macs']:,} |
| epochs, seed | {entry['epochs']}, {entry['seed']} |
| memory layout in training | {'channels_last (NHWC)' if entry['channels_last'] else 'default (NCHW)'} |
| sha256 | `{entry['sha256']}` |

Reproduce: `{entry['command']}` (trains, resumably, then ships the weights).
Input normalisation: ImageNet mean and std, applied to [0, 1] pixels.

## Recipe
{recipe_list(entry['recipe'])}

## Training log
{log_table(read_log(run_dir))}
"""


def reproduce_command(name: str, epochs: int) -> str:
    """The command that trains this model again: the recipe is fixed by its name, and so is the seed."""
    override = "" if epochs == recipe_for(name).recipe.epochs else f" --epochs {epochs}"
    return f"reassembly zoo train {name}{override}"
