"""Pretrained weights shipped inside the package, described by ``weights/manifest.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..errors import CheckpointError, UnknownModelError
from ..io import sha256_of

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


@dataclass(frozen=True)
class ManifestEntry:
    """One shipped model: what it is, how it was trained, how well it does, and its file's hash."""

    name: str
    architecture: str
    num_classes: int
    source_data: str
    classes: list[str]
    image_size: int
    channels: int
    recipe: dict
    epochs: int
    seed: int
    test_accuracy: float
    params: int
    macs: int
    file: str
    sha256: str
    subset_check: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)
    command: str = ""
    channels_last: bool = False  # trained in NHWC layout (a speed setting; it changes dropout's mask order only)


def load_manifest() -> list[ManifestEntry]:
    if not MANIFEST.is_file():
        return []
    return [ManifestEntry(**entry) for entry in json.loads(MANIFEST.read_text())["models"]]


def manifest_entry(name: str) -> ManifestEntry:
    for entry in load_manifest():
        if entry.name == name:
            return entry
    shipped = ", ".join(e.name for e in load_manifest()) or "none yet"
    raise UnknownModelError(f"no pretrained weights named {name!r} (shipped: {shipped}; see `reassembly zoo list`)")


def load_pretrained(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a shipped model and load its weights offline, after checking the file's sha256.

    ``num_classes`` other than the source task's replaces the classifier with a new, randomly initialised one of
    that size (the usual start of fine-tuning on another task); every other weight stays pretrained."""
    from ..checkpoint import load_into
    from ..data import normalization_of, set_normalization
    from .registry import create_model

    entry = manifest_entry(name)
    path = WEIGHTS_DIR / entry.file
    if not path.is_file():
        raise CheckpointError(f"the weights of {name} are missing from the installation ({path})")
    if sha256_of(path) != entry.sha256:
        raise CheckpointError(f"{path} does not match the sha256 recorded in the manifest: reinstall the package")
    model = create_model(entry.architecture, num_classes=entry.num_classes, **{**entry.model_kwargs, **kwargs})
    model.reassembly_metadata = load_into(model, path, model_name=name)
    set_normalization(model, *normalization_of(model, model.reassembly_metadata))  # as it was trained
    model.reassembly_name = entry.architecture
    model.reassembly_pretrained = name
    if num_classes is not None and num_classes != entry.num_classes:
        replace_classifier(model, entry.num_classes, num_classes, name)
    return model


def replace_classifier(model: nn.Module, old: int, new: int, name: str = "the model") -> nn.Linear:
    """Swap the model's last linear layer, which must output ``old`` classes, for a fresh one with ``new``."""
    if new < 1:
        raise CheckpointError(f"a classifier needs at least one class, not {new}")
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1][1].out_features != old:
        raise CheckpointError(f"cannot find the {old}-class classifier of {name} (its last linear layer) to give it "
                              f"{new} classes")
    path, layer = linears[-1]
    fresh = nn.Linear(layer.in_features, new, bias=layer.bias is not None)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], fresh)
    return fresh
