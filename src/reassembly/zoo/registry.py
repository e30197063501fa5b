"""The model registry: one decorator per architecture entry point, looked up by name.

An entry point is a function ``fn(num_classes=..., **kwargs) -> nn.Module``. Names may carry the prefix
``timm:`` to build a timm model instead (needs the ``[timm]`` extra).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalization_of,
    set_normalization,
)
from ..errors import ReassemblyError, UnknownModelError


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about an architecture before it is built."""

    name: str
    family: str
    input_size: tuple[int, int, int]
    default_num_classes: int
    description: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}


def register_model(
    *,
    family: str,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    tags: tuple[str, ...] = (),
):
    """Register ``fn`` under its own name; its docstring's first line becomes the description."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = inspect.getdoc(fn) or ""
        info = ModelInfo(
            name=name,
            family=family,
            input_size=tuple(input_size),
            default_num_classes=num_classes,
            description=doc.splitlines()[0] if doc else "",
            tags=tuple(tags),
        )
        _REGISTRY[name] = (fn, info)
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Names of the built-in architectures matching a shell-style ``pattern`` (sorted)."""
    _import_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; raises :class:`UnknownModelError` with close matches."""
    _import_families()
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name][1]


def is_model(name: str) -> bool:
    _import_families()
    return name in _REGISTRY or name.startswith("timm:")


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a model by registry name.

    ``pretrained=True`` loads the weights shipped with the package (see ``reassembly zoo list``);
    ``checkpoint`` loads a local safetensors or weights-only torch file instead. ``timm:<name>`` builds a
    timm model when the ``[timm]`` extra is installed. The model carries the input normalisation it expects
    (``reassembly.data.normalization_of``): the checkpoint's, else the architecture's. A folder written by
    ``reassembly disassemble`` or ``reassembly assemble`` (an MDA component or assembly) loads with its weights.
    """
    if name.startswith("timm:"):
        return _create_timm(name[len("timm:"):], num_classes, pretrained, checkpoint, **kwargs)
    from pathlib import Path

    if (Path(name) / "component.json").is_file() or (Path(name) / "assembly.json").is_file():
        if pretrained or checkpoint or num_classes or kwargs:
            raise ReassemblyError(f"{name} is a saved MDA component or assembly with its own weights and classes; "
                                  "give only its folder")
        from ..lego import load_lego

        return load_lego(name)
    _import_families()
    if pretrained:
        from .pretrained import load_pretrained

        if checkpoint is not None:
            raise ReassemblyError("give either pretrained=True or a checkpoint, not both")
        return load_pretrained(name, num_classes=num_classes, **kwargs)
    fn, info = _REGISTRY.get(name, (None, None))
    if fn is None:
        raise _unknown(name)
    model = fn(num_classes=info.default_num_classes if num_classes is None else num_classes, **kwargs)
    model.reassembly_name = name
    model.reassembly_kwargs = dict(kwargs)  # how to build it again (e.g. an MDA component's architecture)
    set_normalization(model, info.mean, info.std)
    if checkpoint is not None:
        from ..checkpoint import load_into

        set_normalization(model, *normalization_of(model, load_into(model, checkpoint, model_name=name)))
    return model


def _create_timm(name, num_classes, pretrained, checkpoint, **kwargs) -> nn.Module:
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - timm also fails to import when torchvision is a mismatched CUDA build
        raise ReassemblyError(
            f"'timm:{name}' needs timm, which could not be imported ({type(exc).__name__}: {exc}); "
            "install the extra with `pip install 'reassembly[timm]'`"
        ) from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown timm model {name!r}{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        from ..checkpoint import load_into

        set_normalization(model, *normalization_of(model, load_into(model, checkpoint, model_name=f"timm:{name}")))
    model.reassembly_name = f"timm:{name}"
    return model


def _unknown(name: str) -> UnknownModelError:
    from ..errors import did_you_mean
    from .pretrained import load_manifest

    try:  # the shipped models are names a command takes too
        shipped = [entry.name for entry in load_manifest()]
    except Exception:  # noqa: BLE001 - a broken manifest must not hide the unknown name
        shipped = []
    return UnknownModelError(
        f"unknown model {name!r}{did_you_mean(name, list(_REGISTRY) + shipped)} (`reassembly zoo list --archs` "
        "lists the architectures, `reassembly zoo list` the shipped models; prefix a timm name with 'timm:')"
    )


def _import_families() -> None:
    """Import the architecture modules so that their decorators have run."""
    from . import models  # noqa: F401
