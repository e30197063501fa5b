"""The model card a finished run writes beside its weights (``MODEL_CARD.md``): what was trained, on which data, with
which recipe and seed, how each epoch went, and how well the result does; the zoo's cards reuse its parts."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..measure import count_params


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-epoch entries of a run's ``log.jsonl``."""
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def log_table(log: list[dict]) -> str:
    """The training log as a markdown table, one row per epoch (test top-1 is nan where it was not measured)."""
    rows = [f"| {e['epoch']} | {e['train_loss']:.4f} | {e['train_top1']:.2f} | {e.get('test_top1', float('nan')):.2f} |"
            for e in log]
    return "\n".join(["| epoch | train loss | train top-1 % | test top-1 % |", "|---|---|---|---|", *rows])


def recipe_list(recipe: dict) -> str:
    """A recipe's fields as a markdown list."""
    return "\n".join(f"- `{key}`: {value}" for key, value in recipe.items())


def run_card(title: str, model: nn.Module, train_set, test_set, summary: dict, log: list[dict], mean, std,
             metadata: dict | None = None) -> str:
    """The card of a finished run; ``metadata`` (what the caller recorded, e.g. the command) is listed as given."""
    params, trainable = count_params(model), count_params(model, trainable_only=True)
    final = log[-1].get("test_top1")
    rows = [
        ("model", f"`{type(model).__name__}`, {params:,} parameters ({trainable:,} trained)"),
        ("trained on", (f"`{train_set.name}`: {len(train_set):,} images {_size(train_set)}, "
                        f"{train_set.num_classes} classes ({', '.join(train_set.classes)})")),
        ("tested on", f"`{test_set.name}`: {len(test_set):,} images" if test_set is not None else "no test set"),
        ("final test top-1", f"**{final:.2f} %**" if final is not None else "not measured"),
        ("epochs, seed", f"{summary['epochs']}, {summary['seed']}"),
        ("input normalisation", f"mean {_numbers(mean)}, std {_numbers(std)} of [0, 1] pixels"),
        *((key, f"`{value if isinstance(value, str) else json.dumps(value)}`") for key, value in (metadata or {}).items()),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"""# {title}

| | |
|---|---|
{table}

## Recipe
{recipe_list(summary['recipe'])}

## Training log
{log_table(log)}
"""


def _size(dataset) -> str:
    return "x".join(map(str, dataset.image_size))


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
