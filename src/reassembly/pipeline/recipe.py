"""The recipe of ``reassembly run``: one YAML file that sets every stage of a DeRy reassembly, validated here.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key, a value of the wrong type or a missing
required field is an error naming the key (``search.budget.params: ...``). Only three things have no default: the
target task (``data.target``), the zoo (``zoo``) and the budget (``search.budget``); everything else defaults to the
value the stage's own CLI verb uses. ``Recipe.resolved()`` is the recipe with every default filled in, which
``reassembly run`` writes into the run directory as ``recipe.resolved.yaml``.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ReassemblyError, validation_message
from ..stitch.training import RECIPE as TRAIN_DEFAULTS
from ..train import TrainRecipe

DEMO = "demo.yaml"


class RecipeError(ReassemblyError):
    """A recipe that cannot be read or validated; the message names the file and the key at fault."""


def _check(function, *args):
    """Call a library parser inside a validator: its error becomes a validation error at the field's key."""
    try:
        return function(*args)
    except ReassemblyError as exc:
        raise ValueError(str(exc)) from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    """The target task: what the network is for."""

    target: str = Field(description="dataset spec of the target task, e.g. 'cifar10[5:10]'")
    max_per_class: int | None = Field(None, ge=1, description="train on this many images per class (seeded draw)")
    root: str | None = Field(None, description="folder holding the datasets (default: the usual search path)")

    @field_validator("target")
    @classmethod
    def _readable(cls, value: str) -> str:
        from ..data.dataset import DatasetSpec

        _check(DatasetSpec.parse, value)
        return value


class ZooSection(_Section):
    """The pretrained models whose blocks are reassembled (shipped model names, or a group such as split-cifar)."""

    models: str = Field(description="comma-separated shipped model names or a group, e.g. split-cifar")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"models": data} if isinstance(data, (str, list)) else data

    @field_validator("models", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise ValueError("list the models as names, e.g. [resnet20_cifar5, vit_cifar5]")
            value = ",".join(value)
        return value

    @field_validator("models")
    @classmethod
    def _shipped(cls, value: str) -> str:
        names = zoo_names(value)
        if not names:
            raise ValueError("name at least two shipped models, or a group such as split-cifar")
        from ..zoo.pretrained import load_manifest
        from ..zoo.recipes import ZOO_SETS

        shipped = {entry.name for entry in load_manifest()}
        unknown = [name for name in names if name not in shipped]
        if unknown:
            from ..errors import did_you_mean

            hint = did_you_mean(unknown[0], list(shipped) + list(ZOO_SETS))
            raise ValueError(f"no shipped model named {', '.join(unknown)}{hint} (`reassembly zoo list` lists them: "
                             f"{', '.join(sorted(shipped))}; groups: {', '.join(ZOO_SETS)})")
        if len(names) < 2:
            raise ValueError(f"reassembly needs at least two models, got {names[0]}")
        return value


class SimilaritySection(_Section):
    """DeRy stage 1 (``reassembly similarity``): CKA between the zoo models' node boundaries on probe images."""

    data: str | None = Field(None, description="probe images (default: the target task's)")
    split: Literal["train", "test"] = "train"
    probe_size: int = Field(2000, ge=4)
    batch_size: int = Field(250, ge=4)
    estimator: Literal["minibatch", "exact"] = "minibatch"
    debiased: bool = True
    token_pool: Literal["mean", "cls"] = "mean"
    heatmaps: bool = True


class PartitionSection(_Section):
    """DeRy stage 2 (``reassembly partition``): every model cut into k blocks forming k equivalence sets."""

    k: int = Field(4, ge=1)
    eps: float = Field(0.2, ge=0)
    size: Literal["nodes", "params"] = "nodes"
    general: bool = False
    similarity: Literal["io", "first_last"] = "io"
    restarts: int = Field(50, ge=1)
    iterations: int = Field(50, ge=1)


class BudgetSection(_Section):
    """Bounds on the whole network: parameters and MACs as 0.5M, 60M, 250K...; latency as 2.5ms, 800us."""

    params: str | int | float | None = None
    macs: str | int | float | None = None
    latency: str | int | float | None = None
    min_params: str | int | float | None = None
    min_macs: str | int | float | None = None
    min_latency: str | int | float | None = None

    @field_validator("params", "macs", "min_params", "min_macs")
    @classmethod
    def _count(cls, value, info):
        from ..search import parse_count

        if value is not None:
            _check(parse_count, value, info.field_name)
        return value

    @field_validator("latency", "min_latency")
    @classmethod
    def _time(cls, value):
        from ..search import parse_latency

        if value is not None:
            _check(parse_latency, value)
        return value

    @model_validator(mode="after")
    def _bounded(self) -> BudgetSection:
        if all(value is None for value in self.model_dump().values()):
            raise ValueError("give at least one bound: params, macs or latency (and optionally min_params, ...)")
        _check(self.budget)  # a minimum above its maximum is refused here
        return self

    def budget(self):
        from ..search import Budget

        return Budget.parse(self.params, self.macs, self.latency, self.min_params, self.min_macs, self.min_latency)


class SearchSection(_Section):
    """DeRy stage 3 (``reassembly search``): one block per set within the budget, ranked by a training-free proxy."""

    budget: BudgetSection
    proxy: str = "naswot"
    max_scored: int = Field(1000, ge=0)
    top_k: int = Field(20, ge=1)
    probe_size: int = Field(256, ge=2)
    own_stems: bool = True
    batches: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=2)
    order: Literal["dery", "any"] = "dery"
    method: Literal["partition", "cuts"] = "partition"
    time_limit: float | None = Field(None, gt=0)

    @field_validator("proxy")
    @classmethod
    def _known(cls, value: str) -> str:
        from ..search import get_proxy

        _check(get_proxy, value)
        return value


class StitchSection(_Section):
    """DeRy stage 4 (``reassembly stitch``): the chosen blocks joined by stitches, with a new stem and head."""

    init: Literal["least-squares", "default"] = "least-squares"
    probe_size: int = Field(1000, ge=1)
    recalibrate_norms: bool | None = None  # None: with least squares
    head: Literal["fit", "zero"] = "fit"
    stem: Literal["new", "none"] = "new"
    token_pool: Literal["mean", "cls"] = "mean"


class TrainSection(_Section):
    """DeRy stage 5 (``reassembly train``): frozen (stem, stitches and head) and/or full fine-tuning."""

    modes: list[Literal["frozen", "full"]] = Field(default_factory=lambda: ["frozen"])
    epochs: int = Field(TRAIN_DEFAULTS.epochs, ge=1)
    batch_size: int = Field(TRAIN_DEFAULTS.batch_size, ge=1)
    lr: float = Field(TRAIN_DEFAULTS.lr, gt=0)
    weight_decay: float = Field(TRAIN_DEFAULTS.weight_decay, ge=0)
    warmup_epochs: float = Field(TRAIN_DEFAULTS.warmup_epochs, ge=0)
    label_smoothing: float = Field(TRAIN_DEFAULTS.label_smoothing, ge=0, lt=1)
    augment: bool = TRAIN_DEFAULTS.augment
    flip: bool = TRAIN_DEFAULTS.flip
    block_norm: Literal["eval", "train"] = "eval"
    full_head_start: Literal["zero", "fitted"] = "zero"  # what full fine-tuning starts from (frozen: the fitted one)

    @field_validator("modes", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("modes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each mode once: {value}")
        return value

    def recipe(self) -> TrainRecipe:
        """The training recipe: ``reassembly train``'s defaults with this section's values."""
        fields = self.model_dump(exclude={"modes", "block_norm", "full_head_start"})
        return TrainRecipe(**{**TRAIN_DEFAULTS.model_dump(), **fields})


class EvalSection(_Section):
    """Scores on the target task, and the zoo models within the same budget treated the same way."""

    split: Literal["train", "test"] = "test"
    batch_size: int = Field(256, ge=1)
    baselines: bool = True


class Recipe(_Section):
    """A whole reassembly: target task, zoo, and the settings of every stage."""

    name: str | None = Field(None, description="a name for the run (default: the recipe file's stem)")
    out: str | None = Field(None, description="the run directory (default: runs/NAME; --out overrides)")
    seed: int = 0
    data: DataSection
    zoo: ZooSection
    similarity: SimilaritySection = Field(default_factory=SimilaritySection)
    partition: PartitionSection = Field(default_factory=PartitionSection)
    search: SearchSection
    stitch: StitchSection = Field(default_factory=StitchSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _defaults_from_target(self) -> Recipe:
        if self.similarity.data is None:
            self.similarity.data = self.data.target
        return self

    @property
    def zoo_models(self) -> list[str]:
        return zoo_names(self.zoo.models)

    def resolved(self) -> dict:
        """Every field, defaults included, as plain data (what ``recipe.resolved.yaml`` holds)."""
        return self.model_dump(mode="json")

    def to_yaml(self, header: str = "") -> str:
        text = yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=False, width=100)
        return header + text


def zoo_names(spec: str) -> list[str]:
    """Model names of a zoo spec, groups expanded, in order, without repeats."""
    from ..zoo.recipes import ZOO_SETS

    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item:
            names.extend(ZOO_SETS.get(item, (item,)))
    return list(dict.fromkeys(names))


def demo_path() -> Path:
    """The built-in demo recipe shipped with the package."""
    return Path(str(resources.files("reassembly.pipeline") / "recipes" / DEMO))


def example_text() -> str:
    """The demo recipe, comments included: a template to start from (``reassembly run --print-example``)."""
    return demo_path().read_text()


def load_recipe(source: str | Path | dict | Recipe) -> Recipe:
    """A validated :class:`Recipe` from a YAML file, a dict or a recipe; errors name the file and the key."""
    if isinstance(source, Recipe):
        return source
    where, tree = "recipe", None
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} not found; `reassembly run --print-example > {path.name}` writes a "
                              "template to start from")
        try:
            text = path.read_text()
            source = yaml.safe_load(text)
            tree = yaml.compose(text, Loader=yaml.SafeLoader)  # the same document, with line numbers
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise RecipeError(f"{path} is not valid YAML{line}: {problem}") from None
        if source is None:
            raise RecipeError(f"{path} is empty; `reassembly run --print-example` prints a recipe to start from")
    if not isinstance(source, dict):
        raise RecipeError(f"{where} must be a mapping of sections (data, zoo, similarity, partition, search, stitch, "
                          f"train, eval), not a {type(source).__name__}")
    try:
        recipe = Recipe.model_validate(source)
    except ValidationError as exc:
        line = _line_of(tree, [str(part) for part in exc.errors()[0]["loc"]]) if tree is not None else None
        raise RecipeError(f"{where}{f', line {line}' if line else ''}: {_explain(exc)}") from None
    if recipe.name is None and isinstance(where, str) and where != "recipe":
        recipe.name = Path(where).stem
    return recipe


def _line_of(tree, loc: list[str]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (a key's line; for a key that is missing, its section's line;
    None for a key missing at the top level, which is the whole file's problem)."""
    node, line = tree, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((key, value) for key, value in node.value if str(key.value) == part), None)
            if found is None:
                return line
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:  # a part the recipe does not spell (a scalar turned into a section, a validator's name)
            return line
    return line


def _explain(error: ValidationError) -> str:
    """The first problem, naming the key; an unknown key also gets the closest known ones."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if first["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else f" (known keys: {', '.join(known)})"
        return f"{'.'.join(loc)}: unknown key{hint}"
    message = validation_message(error)
    return message.replace("Value error, ", "")


def _fields_at(loc: list[str]) -> list[str]:
    """The field names of the section at ``loc`` (``[]``: the recipe's top level)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
