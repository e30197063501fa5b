"""A resumable classifier training loop through Hugging Face ``accelerate`` (CPU, one GPU, many GPUs or machines).

A run directory holds ``recipe.json`` (what was asked), ``state.pt`` (the last finished epoch: weights, optimiser,
schedule, log; written atomically and read back with ``weights_only=True``), ``log.jsonl`` (one line per epoch) and,
when done, ``final.safetensors``, ``summary.json`` and ``MODEL_CARD.md``. Each epoch's data order, augmentation and
dropout come from seeds derived from (seed, epoch), so a run resumed at an epoch boundary continues exactly as an
uninterrupted one would.

Launched on several processes (``accelerate launch``, ``torchrun``), ``recipe.batch_size`` is still the global batch:
every process takes its equal part of each batch, in the same data order and with the same augmentation draws as
one process would make, so the run equals a one-process run up to float rounding (dropout masks, and batch-norm
statistics of models that update them in training, are per process). Only the main process writes files; the run
directory must be on a file system all machines share.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..data import ImageDataset, Preprocess, set_normalization
from ..errors import ReassemblyError
from ..io import atomic_path, exclusive, write_text
from .card import run_card
from .evaluate import evaluate, resolve_normalization
from .processes import join_processes
from .recipe import TrainRecipe


def parameter_groups(model: nn.Module, recipe: TrainRecipe) -> list[dict]:
    """Weight decay on weights; none on norm scales and biases unless the recipe asks for it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or recipe.decay_norm_and_bias else no_decay).append(p)
    return [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    groups = parameter_groups(model, recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Linear warm-up to the base rate, then cosine decay to zero; a factor per optimiser step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_classifier(
    model: nn.Module,
    train_set: ImageDataset,
    test_set: ImageDataset | None,
    recipe: TrainRecipe,
    run_dir: str | Path,
    seed: int = 0,
    mean=None,
    std=None,
    metadata: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    channels_last: bool = False,
) -> dict:
    """Train ``model`` in ``run_dir``, resuming from its last finished epoch; returns the summary so far.

    ``recipe.batch_size`` is the global batch, however many processes the run was launched on. Images are
    normalised with ``mean``/``std`` when given (the model then carries them), else with the model's own
    normalisation (``reassembly.data.normalization_of``), which is recorded in ``final.safetensors``.

    ``stop_after`` returns after that many epochs in this call, to split a long run over several sessions;
    ``final.safetensors`` is written only when the recipe's last epoch is done. ``channels_last`` runs convolutions
    in NHWC memory layout, which is much faster on CPU for depthwise convolutions
    (``benchmarks/bench_train_step.py``); it changes kernels and the order in which dropout draws its masks, not
    the function being trained.
    """
    from accelerate import Accelerator, DataLoaderConfiguration

    run_dir = Path(run_dir)
    mean, std = resolve_normalization(model, mean, std)
    set_normalization(model, mean, std)
    join_processes()
    # split_batches: the loader's batch is the global batch, cut into one part per process
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    processes = accelerator.num_processes
    if recipe.batch_size % processes:
        raise ReassemblyError(f"batch size {recipe.batch_size} is the global batch, split over {processes} processes: "
                              f"make it a multiple of {processes}")
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir, "trained") if main else contextlib.nullcontext():
        return _train(accelerator, model, train_set, test_set, recipe, run_dir, seed, mean, std, metadata, progress,
                      stop_after, channels_last)


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int, int]:
    """Seeds of one epoch's data order, augmentation and dropout, from (seed, epoch) alone."""
    draws = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return tuple(draws.tolist())


def _train(accelerator, model, train_set, test_set, recipe, run_dir, seed, mean, std, metadata, progress, stop_after,
           channels_last) -> dict:
    from accelerate.utils import set_seed

    _check_recipe(run_dir, recipe, seed, write=accelerator.is_main_process)
    set_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, recipe)
    steps_per_epoch = math.ceil(len(train_set) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch))
    )
    log: list[dict] = []
    state_path = run_dir / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        log = json.loads(state["log"])
    _check_same_start(accelerator, len(log), run_dir)
    order = torch.Generator()  # the same on every process; accelerate also keeps it in step across them
    loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, drop_last=False,
                                         sampler=torch.utils.data.RandomSampler(train_set, generator=order))
    # a prepared schedule steps once per optimiser step here: with split batches there is one per global batch
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    evaluate_model = accelerator.unwrap_model(model)
    mixed = recipe.mixed_precision == "bf16"
    part = (accelerator.process_index, accelerator.num_processes)
    last_epoch = recipe.epochs if stop_after is None else min(recipe.epochs, len(log) + stop_after)
    for epoch in range(len(log), last_epoch):
        order_seed, augment_seed, dropout_seed = epoch_seeds(seed, epoch)
        order.manual_seed(order_seed)
        torch.manual_seed(dropout_seed + accelerator.process_index)  # each process draws its own dropout masks
        augment = Preprocess(mean, std, augment=recipe.augment, padding=recipe.crop_padding, flip=recipe.flip,
                             generator=torch.Generator().manual_seed(augment_seed), part=part)
        model.train()  # the model's own train(): it may keep some of its modules in eval mode
        started, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"{run_dir.name} epoch {epoch + 1}/{recipe.epochs}", unit="batch",
                   disable=not progress or not accelerator.is_local_main_process, leave=False)
        for images, labels in bar:
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed):
                logits = model(augment(images).contiguous(memory_format=memory_format))
                loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
            if not torch.isfinite(loss):
                raise ReassemblyError(f"training {run_dir.name} diverged at epoch {epoch + 1} (loss {loss.item()}); "
                                      "lower the learning rate or add warm-up")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if recipe.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            schedule.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        seen, loss_sum, correct = accelerator.reduce(
            torch.tensor([seen, loss_sum, correct], dtype=torch.float64, device=accelerator.device), "sum").tolist()
        _share_buffers(evaluate_model, processes=accelerator.num_processes)
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
                 "lr": schedule.get_last_lr()[0], "seconds": round(time.time() - started, 1)}
        if test_set is not None and ((epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs):
            result = evaluate(evaluate_model, test_set, device=accelerator.device, progress=False)
            entry["test_top1"] = result.top1
        log.append(entry)
        if accelerator.is_main_process:
            _save_state(state_path, evaluate_model, optimizer, schedule, log)
            write_text(run_dir / "log.jsonl", "".join(json.dumps(e) + "\n" for e in log))  # whole, as in the state
        accelerator.print(json.dumps(entry))
    summary = {"epochs": len(log), "seed": seed, "final": log[-1] if log else {}, "recipe": recipe.model_dump()}
    if accelerator.is_main_process and len(log) == recipe.epochs:
        save_checkpoint(evaluate_model, run_dir / "final.safetensors",
                        metadata={**(metadata or {}), "mean": list(mean), "std": list(std), **summary})
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text(run_dir / "MODEL_CARD.md", run_card(run_dir.name, evaluate_model, train_set, test_set, summary, log,
                                                       mean, std, metadata))
    accelerator.wait_for_everyone()  # every process returns once the run's files are written
    return summary


def _check_same_start(accelerator, epochs_done: int, run_dir: Path) -> None:
    """All processes must resume from the same epoch (they read one run directory)."""
    if accelerator.num_processes == 1:
        return
    found = accelerator.gather(torch.tensor([epochs_done], device=accelerator.device)).tolist()
    if len(set(found)) > 1:
        raise ReassemblyError(f"the processes found {sorted(set(found))} finished epochs in {run_dir}: put the run "
                              "directory on a file system that every machine shares")


def _share_buffers(model: nn.Module, processes: int) -> None:
    """Give every process the main process's buffers, as DDP does before each forward pass: batch-norm statistics
    were last updated by each process from its own part of a batch, and one model must be evaluated and saved."""
    if processes == 1:
        return
    for buffer in model.buffers():
        shared = buffer.contiguous()  # a channels_last buffer is sent as a plain copy
        torch.distributed.broadcast(shared, src=0)
        buffer.copy_(shared)


def _check_recipe(run_dir: Path, recipe: TrainRecipe, seed: int, write: bool) -> None:
    """Refuse to resume a run made with another recipe or seed; record the recipe of a new run (when ``write``)."""
    wanted = {"recipe": recipe.model_dump(), "seed": seed}
    path = run_dir / "recipe.json"
    if path.is_file():
        found = json.loads(path.read_text())
        try:  # fill in fields added to TrainRecipe since the run began, at their defaults
            found["recipe"] = TrainRecipe(**found["recipe"]).model_dump()
        except (KeyError, TypeError, ValueError):
            pass  # unreadable: it cannot match, and the error below says what to do
        if found != wanted:
            raise ReassemblyError(
                f"{run_dir} holds a run with another recipe or seed ({path}); resume it with the same settings, "
                "or choose a new --out directory"
            )
        return
    if write:
        write_text(path, json.dumps(wanted, indent=2) + "\n")


def _save_state(path: Path, model: nn.Module, optimizer, schedule, log: list[dict]) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "log": json.dumps(log)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
