"""Safe checkpoints: safetensors, or torch files read with ``weights_only=True``; never arbitrary unpickling.

Everything this library saves is safetensors with JSON metadata (safetensors metadata values must be strings,
so each value is JSON-encoded).
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .io import atomic_path


class ClassCountError(CheckpointError):
    """A checkpoint whose classifier has another number of classes than the model it is loaded into."""

    def __init__(self, message: str, checkpoint_classes: int, model_classes: int):
        super().__init__(message)
        self.checkpoint_classes, self.model_classes = checkpoint_classes, model_classes

TORCH_SUFFIXES = {".pt", ".pth", ".th", ".bin", ".ckpt", ".tar"}
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint file, with training wrappers and ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or save? fetch or save it again")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                raw_meta = handle.metadata() or {}
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
        return _strip_prefixes(tensors), {k: _decode(v) for k, v in raw_meta.items()}
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors or a torch file "
            f"({', '.join(sorted(TORCH_SUFFIXES))})"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it will refuse anyway
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{path} is not a torch checkpoint (neither a torch zip archive nor a pickle); "
                                  "is it the right file, and complete?") from None
        found = re.search(r"(?:unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc), re.IGNORECASE)
        reason = f"it names {found[1]}" if found else "it holds Python objects"
        raise CheckpointError(
            f"refusing {path}: reading it would unpickle arbitrary Python objects, which can run code ({reason}). "
            f"If you trust the file, convert it once with `reassembly convert {path} OUT.safetensors --trust-pickle`"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    return _unwrap(obj, path)


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a file torch.save writes: a zip archive, or a pickle (protocol 2+)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    metadata: dict[str, Any] = {}
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        metadata.update({k: v for k, v in obj.items() if k != inner and isinstance(v, (int, float, str, bool))})
        obj = obj[inner]
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return _strip_prefixes(dict(obj)), metadata


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def load_into(model: nn.Module, path: str | Path, model_name: str | None = None) -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly; returns the checkpoint's metadata.

    Mismatches are reported by name, a classifier of the wrong width says how many classes the checkpoint was
    trained for, and NaN or infinite weights are refused (they would only give NaN outputs and a chance-level
    score).
    """
    state, metadata = read_state_dict(path)
    own = model.state_dict()
    label = model_name or getattr(model, "reassembly_name", type(model).__name__)
    for key in own:  # checkpoints from before PyTorch 0.4.1 lack BN's step counter; it does not affect outputs
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    classes = _classifier_width_mismatch(model, state, wrong_shape) if wrong_shape and not (missing or unexpected) \
        else None
    if classes is not None:
        raise ClassCountError(
            f"{path} was trained for {classes[0]} classes but model {label} was built with {classes[1]}: "
            f"pass --num-classes {classes[0]} (or num_classes={classes[0]})", classes[0], classes[1]
        )
    if wrong_shape or missing or unexpected:
        parts = []
        if wrong_shape:
            details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:3])
            parts.append(f"shape mismatch in {len(wrong_shape)} tensors (e.g. {details}; checkpoint vs model)")
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path} does not fit model {label}: {'; '.join(parts)}; is it the right architecture?")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path} holds NaN or infinite values in {len(broken)} of its {len(state)} tensors "
                              f"(e.g. {', '.join(broken[:3])}): the training that wrote it diverged or the file was "
                              "damaged; load an earlier checkpoint or train again")
    model.load_state_dict(state, strict=True)
    return metadata


def _classifier_width_mismatch(model: nn.Module, state, wrong_shape) -> tuple[int, int] | None:
    """(checkpoint classes, model classes) when the only mismatch is the last linear layer's output width."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    last = linears[-1]
    if set(wrong_shape) <= {f"{last}.weight", f"{last}.bias"} and f"{last}.weight" in state:
        theirs, ours = state[f"{last}.weight"].shape, model.state_dict()[f"{last}.weight"].shape
        if theirs[0] != ours[0] and theirs[1:] == ours[1:]:  # a different width of input is another network
            return int(theirs[0]), int(ours[0])
    return None


def save_checkpoint(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                    metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a safetensors file atomically; ``metadata`` values are stored JSON-encoded.

    ``dtype`` (e.g. ``torch.float16``) casts floating-point tensors to shrink shipped weights.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are saved as .safetensors only")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()  # clone: safetensors refuses tensors that share memory
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def convert_trusted_pickle(src: str | Path, dst: str | Path) -> Path:
    """Re-save a pickled torch checkpoint as safetensors. Only for files the user trusts: this unpickles."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"checkpoint not found: {src}")
    if src.stat().st_size == 0:
        raise CheckpointError(f"{src} is empty (0 bytes): an interrupted download or save? fetch or save it again")
    if not _looks_like_torch_file(src):
        raise CheckpointError(f"{src} is not a torch checkpoint (neither a torch zip archive nor a pickle); is it the "
                              "right file, and complete?")
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{src} is not a readable torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    state, metadata = _unwrap(obj, src)
    try:
        return save_checkpoint(state, dst, metadata={**metadata, "converted_from": src.name})
    except OSError as exc:
        raise CheckpointError(f"cannot write {dst}: {exc.strerror or exc}") from None
