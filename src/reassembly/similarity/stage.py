"""The similarity stage: stream a probe set through every model of a zoo and accumulate CKA between the boundaries
of their node chains.

Reads: the zoo (:class:`ZooMember`: a model, its name and normalisation) and a probe :class:`ImageDataset`.
Writes, in the output directory (each file atomically; the index last, so its presence means the run finished):

* ``similarity.json``: the index. Settings, each model's node chain (names, shapes, parameters, MACs) and one entry
  per model pair naming its files.
* ``cka/A__B.npz`` per model pair: ``input`` (L_A x L_B linear CKA between the nodes' inputs), ``output`` (between
  their outputs), and the point matrices ``points_biased`` / ``points_debiased`` of shape (L_A + 1, L_B + 1), where
  point p is the tensor entering node p (p = 0 the model input, p = L the model output; see ``graph/taps.py``).
  ``input`` and ``output`` hold the kind named by the settings (``debiased``, the default).
* ``progress/rank-R-of-W.npz`` while running: the accumulated sums and how many batches they cover. An interrupted
  run started again with the same settings continues from there and ends with the same matrices; it is removed
  when the run completes.

Every model sees the same probe images in the same batches; one forward pass per model and batch feeds all of its
points into the accumulators of every pair (``graph.tap``). The probe set can be sharded over processes launched
by ``accelerate launch`` or ``torchrun``: rank r takes batches r, r + W, ... and the sums are added at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..data import ImageDataset, normalize
from ..errors import ReassemblyError
from ..graph import NodeChain, dissect, tap
from ..graph.taps import TOKEN_POOLS
from ..io import atomic_path, interrupts_deferred, write_text
from .cka import ESTIMATORS, StreamingCKA, min_samples

INDEX = "similarity.json"
FORMAT = "reassembly.similarity/1"


@dataclass
class ZooMember:
    """One model of the zoo as the similarity stage sees it."""

    name: str
    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int] = (3, 32, 32)
    source: dict = field(default_factory=dict)  # where it came from (pretrained name, architecture), for the record


def load_zoo(spec: str, image_size: int | None = None) -> list[ZooMember]:
    """Shipped pretrained models by name, comma-separated, or a named group (``split-cifar``), as zoo members with
    the normalisation they were trained with; ``image_size`` overrides the size they were trained at."""
    from ..data import normalization_of
    from ..errors import UnknownModelError, did_you_mean
    from ..zoo import create_model
    from ..zoo.pretrained import load_manifest
    from ..zoo.recipes import ZOO_SETS

    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item:
            names.extend(ZOO_SETS.get(item, (item,)))
    shipped = {entry.name: entry for entry in load_manifest()}
    unknown = [name for name in names if name not in shipped]
    if unknown:
        raise UnknownModelError(
            f"no shipped model named {', '.join(unknown)}{did_you_mean(unknown[0], list(shipped) + list(ZOO_SETS))} "
            f"(`reassembly zoo list` lists them: {', '.join(sorted(shipped))}; groups: {', '.join(ZOO_SETS)})"
        )
    members = []
    for name in dict.fromkeys(names):
        entry = shipped[name]
        model = create_model(name, pretrained=True)
        mean, std = normalization_of(model)
        size = image_size or entry.image_size
        members.append(ZooMember(name, model, mean, std, (3, size, size),
                                 {"pretrained": name, "architecture": entry.architecture}))
    return members


@dataclass
class SimilarityRun:
    """A finished similarity stage: the index and the chains (``load_similarity`` reads it back)."""

    directory: Path
    index: dict

    @property
    def models(self) -> list[str]:
        return [model["name"] for model in self.index["models"]]

    def chain(self, name: str) -> dict:
        return next(model["chain"] for model in self.index["models"] if model["name"] == name)

    def pair_file(self, a: str, b: str) -> tuple[Path, bool]:
        """The npz of pair (a, b) and whether its matrices are stored the other way round (b, a)."""
        for pair in self.index["pairs"]:
            if (pair["a"], pair["b"]) in ((a, b), (b, a)):
                return self.directory / pair["file"], pair["a"] != a
        raise ReassemblyError(f"{self.directory / INDEX} has no pair ({a}, {b}); models: {', '.join(self.models)}")

    def points(self, a: str, b: str, debiased: bool = True) -> np.ndarray:
        """(L_a + 1, L_b + 1) CKA between the points of models a and b."""
        path, flipped = self.pair_file(a, b)
        with np.load(path) as arrays:
            matrix = arrays["points_debiased" if debiased else "points_biased"]
        return matrix.T if flipped else matrix


def load_similarity(directory: str | Path) -> SimilarityRun:
    """Read a finished similarity stage from its output directory."""
    directory = Path(directory)
    path = directory / INDEX
    if not path.is_file():
        hint = " (it holds an unfinished run: start `reassembly similarity` again to resume it)" if (
            directory / "progress").is_dir() else ""
        raise ReassemblyError(f"{path} does not exist: run `reassembly similarity --out {directory}` first{hint}")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReassemblyError(f"{path} is not valid JSON ({error}); run the similarity stage again") from None
    if index.get("format") != FORMAT:
        raise ReassemblyError(f"{path} is not a similarity index of this version (format {index.get('format')!r})")
    return SimilarityRun(directory, index)


def batch_bounds(samples: int, batch_size: int) -> list[tuple[int, int]]:
    """Near-equal batches of at most about ``batch_size`` images, none smaller than 4 (the unbiased estimators'
    minimum), identical for every process of a sharded run."""
    count = max(1, min(math.ceil(samples / batch_size), samples // 4))
    edges = np.linspace(0, samples, count + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by accelerate or torchrun."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..train.processes import join_processes

        state = join_processes()
        return state.process_index, state.num_processes
    return 0, 1


def _features(chain: NodeChain, member: ZooMember, images: torch.Tensor, token_pool: str) -> list[torch.Tensor]:
    """Pooled features of every point of ``member`` on a batch of uint8 images."""
    with torch.no_grad():
        pooled = tap(chain, normalize(images, member.mean, member.std), token_pool=token_pool)
    return [pooled[p] for p in range(len(chain) + 1)]


def _reference(zoo: list[ZooMember], chains: dict, images: torch.Tensor, token_pool: str, world: int) -> dict:
    """Features of the first probe batch, the translation every shard subtracts (rank 0's, broadcast)."""
    reference = {member.name: _features(chains[member.name], member, images, token_pool) for member in zoo}
    if world > 1:
        import torch.distributed as dist

        for points in reference.values():
            for point in points:
                dist.broadcast(point, src=0)
    return reference


def _pair_name(a: str, b: str) -> str:
    return f"{a}__{b}"


def compute_similarity(
    zoo: list[ZooMember],
    probe: ImageDataset,
    out_dir: str | Path,
    *,
    settings: dict | None = None,
    batch_size: int = 250,
    estimator: str = "minibatch",
    token_pool: str = "mean",
    debiased: bool = True,
    heatmaps: bool = True,
    progress: bool = True,
    checkpoint_seconds: float = 60.0,
    stop_after: int | None = None,
) -> SimilarityRun | None:
    """Accumulate CKA between every node boundary of every pair of ``zoo`` models over ``probe``; write the stage's
    artifacts into ``out_dir`` (see the module docstring) and return them.

    ``settings`` (e.g. how the probe set was drawn) are recorded in the index and must match when resuming.
    ``stop_after`` stops after that many batches in this call and returns None, leaving a resumable run."""
    out_dir = Path(out_dir)
    names = [member.name for member in zoo]
    if len(zoo) < 2:
        raise ReassemblyError(f"similarity compares models: the zoo needs at least two, got {names or 'none'}")
    if len(set(names)) != len(names):
        raise ReassemblyError(f"the zoo names a model twice: {', '.join(names)}")
    if estimator not in ESTIMATORS:
        raise ReassemblyError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    if token_pool not in TOKEN_POOLS:
        raise ReassemblyError(f"token pooling must be one of {', '.join(TOKEN_POOLS)}, not {token_pool!r}")
    if len(probe) < min_samples(debiased=True):
        raise ReassemblyError(
            f"the probe set has {len(probe)} images; CKA needs at least {min_samples(True)} (the unbiased HSIC "
            "estimate divides by n - 3): use a larger --probe-size"
        )
    record = {
        **(settings or {}),
        "models": names,
        "probe_images": len(probe),
        "batch_size": batch_size,
        "estimator": estimator,
        "token_pool": token_pool,
        "debiased": debiased,
    }
    if (out_dir / INDEX).is_file():
        existing = load_similarity(out_dir)
        if existing.index["settings"] != record:
            raise ReassemblyError(
                f"{out_dir} already holds a finished similarity run with other settings; choose another --out or "
                "delete it"
            )
        return existing

    chains = {}
    for member in zoo:
        if tuple(probe.image_size) != tuple(member.input_size):
            raise ReassemblyError(
                f"{member.name} takes inputs of size {tuple(member.input_size)} but the probe images are "
                f"{tuple(probe.image_size)}: load the probe data at the model's size"
            )
        chains[member.name] = dissect(member.model.eval(), member.input_size, name=member.name)

    rank, world = _distributed()
    bounds = batch_bounds(len(probe), batch_size)
    if world > len(bounds):
        raise ReassemblyError(f"{world} processes share only {len(bounds)} probe batches; use fewer processes")
    mine = bounds[rank::world]
    first = probe.images[slice(*bounds[0])]
    reference = _reference(zoo, chains, first, token_pool, world)
    widths = {name: [point.shape[1] for point in points] for name, points in reference.items()}
    accumulator = StreamingCKA(widths, estimator, reference=reference)
    progress_path = out_dir / "progress" / f"rank-{rank}-of-{world}.npz"
    done = _resume(accumulator, progress_path, record)

    bars = [
        tqdm(total=len(mine), initial=done, desc=f"{member.name:<20}", unit="batch", position=i, leave=False,
             disable=not progress or rank != 0)
        for i, member in enumerate(zoo)
    ]
    last_save, started = time.monotonic(), time.monotonic()
    processed = 0
    try:
        for start, stop in mine[done:]:
            if stop_after is not None and processed >= stop_after:
                break
            images = probe.images[start:stop]
            features = {}
            for member, bar in zip(zoo, bars):
                if (start, stop) == bounds[0]:  # the reference already holds the features of the first batch
                    features[member.name] = reference[member.name]
                else:
                    features[member.name] = _features(chains[member.name], member, images, token_pool)
                bar.update(1)
            with interrupts_deferred():  # Ctrl-C saves the progress below: never half an update
                accumulator.update(features)
                done, processed = done + 1, processed + 1
            if time.monotonic() - last_save >= checkpoint_seconds:
                _save_progress(accumulator, progress_path, record, done)
                last_save = time.monotonic()
    except KeyboardInterrupt:  # keep the batches done so far: the same call resumes after them
        _save_progress(accumulator, progress_path, record, done)
        raise
    finally:
        for bar in bars:
            bar.close()
    if done < len(mine):
        _save_progress(accumulator, progress_path, record, done)
        return None

    if world > 1:
        _all_reduce(accumulator)
    if rank != 0:
        return None
    run = _write_outputs(out_dir, zoo, chains, accumulator, record, debiased, heatmaps, time.monotonic() - started,
                         world)
    shutil.rmtree(out_dir / "progress", ignore_errors=True)
    return run


def similarity_stage(zoo: str, data: str, out_dir: str | Path, *, split: str = "train", probe_size: int = 2000,
                     seed: int = 0, image_size: int | None = None, data_root=None, batch_size: int = 250,
                     estimator: str = "minibatch", token_pool: str = "mean", debiased: bool = True,
                     heatmaps: bool = True, progress: bool = True, checkpoint_seconds: float = 60.0,
                     stop_after: int | None = None) -> SimilarityRun | None:
    """``reassembly similarity``: load the shipped models of ``zoo`` (names or a group, see :func:`load_zoo`), draw
    ``probe_size`` images of ``data``'s ``split`` at random with ``seed`` and run :func:`compute_similarity` into
    ``out_dir``. The draw is recorded in the settings, so the same call resumes an unfinished run or returns the
    finished one."""
    from ..data import load_dataset

    if probe_size < 1:
        raise ReassemblyError(f"--probe-size {probe_size} leaves the probe set empty; give at least 4 images")
    if batch_size < 4:
        raise ReassemblyError(f"--batch-size {batch_size} is too small: unbiased HSIC needs batches of at least 4")
    members = load_zoo(zoo, image_size)
    size = members[0].input_size[1]
    images = load_dataset(data, split, root=data_root, image_size=size, channels=3)
    if len(images) == 0:
        raise ReassemblyError(f"{images.name} {split} holds no images: the probe set would be empty")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:probe_size]
    probe = images.subset(order)
    settings = {"zoo": zoo, "data": images.name, "split": split, "probe_size": len(probe), "seed": seed,
                "image_size": size}
    return compute_similarity(members, probe, out_dir, settings=settings, batch_size=batch_size, estimator=estimator,
                              token_pool=token_pool, debiased=debiased, heatmaps=heatmaps, progress=progress,
                              checkpoint_seconds=checkpoint_seconds, stop_after=stop_after)


def _resume(accumulator: StreamingCKA, path: Path, record: dict) -> int:
    """Load a saved partial run into ``accumulator``; return how many of this rank's batches it covers."""
    if not path.is_file():
        return 0
    with np.load(path) as saved:
        state = {key: saved[key] for key in saved.files}
    saved_record = json.loads(str(state.pop("__settings__")))
    if saved_record != record:
        raise ReassemblyError(
            f"{path.parent.parent} holds an unfinished similarity run with other settings; start it again with the "
            "same options to resume, or choose another --out"
        )
    done = int(state.pop("__batches_done__"))
    accumulator.load_state(state)
    return done


def _save_progress(accumulator: StreamingCKA, path: Path, record: dict, done: int) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, __settings__=np.array(json.dumps(record, sort_keys=True)),
                     __batches_done__=np.array(done), **accumulator.state())


def _all_reduce(accumulator: StreamingCKA) -> None:
    import torch.distributed as dist

    state = accumulator.state()
    summed = {}
    for key in sorted(state):
        tensor = torch.from_numpy(np.ascontiguousarray(state[key]))
        dist.all_reduce(tensor)
        summed[key] = tensor.numpy()
    accumulator.load_state(summed)


def _write_outputs(out_dir: Path, zoo: list[ZooMember], chains: dict[str, NodeChain], accumulator: StreamingCKA,
                   record: dict, debiased: bool, heatmaps: bool, seconds: float, processes: int) -> SimilarityRun:
    """Pair matrices and heatmaps first, the index last: a run is finished exactly when its index exists."""
    from .plots import plot_pair

    pairs = []
    for a, b in accumulator.pairs:
        biased, unbiased = accumulator.result(a, b, False), accumulator.result(a, b, True)
        chosen = unbiased if debiased else biased
        name = _pair_name(a, b)
        with atomic_path(out_dir / "cka" / f"{name}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, input=chosen[:-1, :-1], output=chosen[1:, 1:], points_biased=biased,
                         points_debiased=unbiased)
        pair = {"a": a, "b": b, "file": f"cka/{name}.npz"}
        if heatmaps:
            pair["heatmap"] = f"heatmaps/{name}.png"
            plot_pair(chosen, chains[a].to_dict(), chains[b].to_dict(), out_dir / pair["heatmap"],
                      title=f"linear CKA{' (debiased)' if debiased else ''}, {accumulator.samples} probe images")
        pairs.append(pair)
    index = {
        "format": FORMAT,
        "settings": record,
        "samples": accumulator.samples,
        "seconds": round(seconds, 2),
        "processes": processes,
        "points": "point p is the tensor entering chain node p (0: the model input, L: the model output); "
                  "input[i, j] = points[i, j] and output[i, j] = points[i + 1, j + 1]",
        "models": [
            {
                "name": member.name,
                "source": member.source,
                "input_size": list(member.input_size),
                "mean": list(member.mean),
                "std": list(member.std),
                "degenerate_points": accumulator.degenerate(member.name),
                "chain": chains[member.name].to_dict(),
            }
            for member in zoo
        ],
        "pairs": pairs,
    }
    write_text(out_dir / INDEX, json.dumps(index, indent=1) + "\n")
    return SimilarityRun(out_dir, index)

