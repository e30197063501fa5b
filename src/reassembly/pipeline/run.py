"""``run_recipe``: every DeRy stage from one recipe, each writing its usual artifact into one run directory.

The run directory (each stage's artifact is the one its own CLI verb writes):

* ``recipe.resolved.yaml``: the recipe with every default filled in, rewritten at the start of every run;
* ``similarity/``: stage 1, ``reassembly similarity`` (``similarity.json``, ``cka/*.npz``, ``heatmaps/*.png``);
* ``partition.json`` and ``partition.png``: stage 2, ``reassembly partition``;
* ``search.json``: stage 3, ``reassembly search`` (ranked candidates and the choice);
* ``net/``: stage 4, ``reassembly stitch`` (the chosen blocks stitched and fitted, before any training);
* ``net/train-MODE/``: stage 5, ``reassembly train`` for each training mode (the trained network, log, card);
* ``baselines/``: every zoo model within the same budget, as its body with a new head, fitted and trained the same
  way on the same data (``baselines.json``, ``NAME/net/``, ``NAME/net/train-MODE/``);
* ``eval.json``: every network above scored on the target task's test split;
* ``MODEL_CARD.md``: the reassembled network, its blocks and where they come from, cost, accuracy, and the command
  that makes it again;
* ``stages/NAME.json``: what each stage was run with and the hashes of what it wrote (:mod:`.ledger`);
* ``report.html``: all of the above as one self-contained page (:mod:`.html_report`), rewritten at the end of every
  call, so that it shows the run as it stands.

Running a recipe again skips each stage whose record matches and whose artifacts are intact; a stage whose settings
changed, whose upstream artifact changed or whose own artifact is missing or corrupt runs again, and so does every
stage downstream of it; an interrupted stage resumes (see :mod:`.ledger` for the exact rule).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReassemblyError
from ..io import exclusive, write_text
from .ledger import Ledger
from .recipe import Recipe, load_recipe

RESOLVED = "recipe.resolved.yaml"


@dataclass
class StageOutcome:
    """What happened to one stage in this call: ``skipped``, ``ran``, ``resumed`` or ``stopped``, why, and how long."""

    name: str
    status: str
    reason: str
    seconds: float = 0.0


@dataclass
class RunResult:
    out: Path
    recipe: Recipe
    stages: list[StageOutcome] = field(default_factory=list)
    eval: dict | None = None  # eval.json, once the run has got that far
    report: Path | None = None  # report.html, when it was written

    @property
    def statuses(self) -> dict[str, str]:
        return {stage.name: stage.status for stage in self.stages}

    @property
    def finished(self) -> bool:
        return self.eval is not None


@dataclass
class _Stage:
    name: str
    settings: dict
    upstream: tuple[str, ...]
    outputs: tuple[str, ...]  # paths (relative to the run directory) removed when the stage starts afresh
    run: Callable[[], bool]  # True when finished, False when stopped early (stop_after)
    files: Callable[[], list[Path]]  # the artifact files to fingerprint once it has finished
    artifact: str  # what to name in the progress line


def run_dir_of(recipe: Recipe, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    if recipe.out is not None:
        return Path(recipe.out)
    return Path("runs") / (recipe.name or "run")


def run_recipe(source: str | Path | dict | Recipe, out: str | Path | None = None, *, force: bool = False,
               data_root: str | None = None, progress: bool = False, echo: Callable[[str], None] = print,
               stop_after: dict[str, int] | None = None, command: str | None = None,
               report: bool = True) -> RunResult:
    """Run every stage of the recipe ``source`` (a YAML path, a dict or a :class:`Recipe`) into ``out`` (default: the
    recipe's ``out``, else ``runs/NAME``), skipping those already done; print one line per stage with ``echo``.

    ``force`` runs every stage afresh. ``stop_after`` maps a stage name to a count at which to stop it early and
    return (``similarity``: probe batches, ``train-MODE``: epochs), leaving it to resume on the next call: to split a
    long run over several sessions, and for tests. ``command`` is how the user ran it, for the model card. ``report``
    writes ``report.html`` at the end, also when the run stopped early (its missing sections say so)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ReassemblyError("reassembly run drives one process; launch the stage verbs (reassembly similarity, "
                              "train, eval) under accelerate or torchrun instead, on the run directory's files")
    recipe = load_recipe(source)
    if data_root is not None:
        recipe.data.root = str(data_root)
    run_dir = run_dir_of(recipe, out)
    recipe.out = str(run_dir)
    if recipe.name is None:
        recipe.name = run_dir.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the run directory or a folder above it is a file
        blocker = next(p for p in [run_dir, *run_dir.parents] if p.exists())
        raise ReassemblyError(f"run directory {run_dir} cannot be created: {blocker} is a file, not a folder; set "
                              "another `out` in the recipe or pass --out") from None
    with exclusive(run_dir, "run"):
        origin = str(source) if isinstance(source, (str, Path)) else "a recipe given in Python"
        header = (f"# The recipe of this run with every default filled in (from {origin}).\n"
                  f"# Run it again (stages already done are skipped): reassembly run {run_dir / RESOLVED}\n")
        write_text(run_dir / RESOLVED, recipe.to_yaml(header))
        pipeline = _Pipeline(recipe, run_dir, progress, stop_after or {}, command or _command(source, run_dir))
        result = pipeline.execute(force, echo)
        if report:
            from .html_report import write_html_report

            result.report = write_html_report(run_dir)
        return result


def _command(source, run_dir: Path) -> str:
    if isinstance(source, (str, Path)):
        return f"reassembly run {source} --out {run_dir}"
    return f"reassembly run {run_dir / RESOLVED}"


class _Pipeline:
    def __init__(self, recipe: Recipe, run_dir: Path, progress: bool, stop_after: dict[str, int], command: str):
        self.recipe, self.run_dir, self.progress = recipe, run_dir, progress
        self.stop_after, self.command = stop_after, command
        self.ledger = Ledger(run_dir)
        stoppable = {"similarity", *(f"train-{mode}" for mode in recipe.train.modes)}
        unknown = set(stop_after) - stoppable
        if unknown:
            raise ReassemblyError(f"stop_after: {', '.join(sorted(unknown))} cannot be stopped early in this recipe "
                                  f"(these can: {', '.join(sorted(stoppable))})")

    # -- the plan ------------------------------------------------------------------------------------------------
    def stages(self) -> list[_Stage]:
        r = self.recipe
        data = {"target": r.data.target, "max_per_class": r.data.max_per_class, "seed": r.seed}
        train = {"recipe": r.train.recipe().model_dump(), "block_norm": r.train.block_norm,
                 "full_head_start": r.train.full_head_start}
        stages = [
            _Stage("similarity", {**r.similarity.model_dump(), "zoo": r.zoo_models, "weights": self._weights(),
                                  "seed": r.seed},
                   (), ("similarity",), self._similarity, self._similarity_files, "similarity/"),
            _Stage("partition", {**r.partition.model_dump(), "debiased": r.similarity.debiased, "seed": r.seed},
                   ("similarity",), ("partition.json", "partition.png"), self._partition,
                   lambda: [self.run_dir / "partition.json"], "partition.json"),
            _Stage("search", {**r.search.model_dump(exclude={"budget"}), "budget": r.search.budget.budget().to_dict(),
                              **data},
                   ("partition",), ("search.json",), self._search, lambda: [self.run_dir / "search.json"],
                   "search.json"),
            _Stage("stitch", {**r.stitch.model_dump(), **data}, ("search",),
                   ("net/structure.json", "net/model.safetensors"), self._stitch,
                   lambda: _net_files(self.run_dir / "net"), "net/"),
        ]
        for mode in r.train.modes:
            stages.append(_Stage(f"train-{mode}", {"mode": mode, **train, **data}, ("stitch",), (f"net/train-{mode}",),
                                 lambda mode=mode: self._train(mode),
                                 lambda mode=mode: _net_files(self.run_dir / "net" / f"train-{mode}", summary=True),
                                 f"net/train-{mode}/"))
        if r.eval.baselines:
            stages.append(_Stage("baselines", {"zoo": r.zoo_models, "weights": self._weights(),
                                               "budget": r.search.budget.budget().to_dict(),
                                               "stitch": r.stitch.model_dump(), "modes": r.train.modes, **train,
                                               **data},
                                 (), ("baselines",), self._baselines, self._baseline_files, "baselines/"))
        upstream = ("search", "stitch", *(f"train-{mode}" for mode in r.train.modes),
                    *(("baselines",) if r.eval.baselines else ()))
        stages.append(_Stage("eval", {**r.eval.model_dump(), **data, "modes": r.train.modes}, upstream,
                             ("eval.json", "MODEL_CARD.md"), self._eval,
                             lambda: [self.run_dir / "eval.json", self.run_dir / "MODEL_CARD.md"], "eval.json"))
        return stages

    def _weights(self) -> dict[str, str]:
        """The sha256 of each zoo model's shipped weights: new weights make a new similarity run."""
        from ..zoo.pretrained import manifest_entry

        return {name: manifest_entry(name).sha256 for name in self.recipe.zoo_models}

    # -- execution ------------------------------------------------------------------------------------------------
    def execute(self, force: bool, echo: Callable[[str], None]) -> RunResult:
        stages = self.stages()
        result = RunResult(self.run_dir, self.recipe)
        digests: dict[str, str] = {}
        width = max(len(stage.name) for stage in stages)
        for index, stage in enumerate(stages, start=1):
            label = f"[{index}/{len(stages)}] {stage.name:<{width}}"
            upstream = {name: digests[name] for name in stage.upstream}
            key = Ledger.key(stage.settings, upstream)
            decision = self.ledger.decide(stage.name, key, stage.settings, upstream, stage.outputs, force)
            if decision.action == "skip":
                digests[stage.name] = self.ledger.read(stage.name)["digest"]
                result.stages.append(StageOutcome(stage.name, "skipped", decision.reason))
                echo(f"{label}  skipped: up to date ({stage.artifact})")
                continue
            if decision.clean:
                self.ledger.clean(stage.name, list(stage.outputs))
            echo(f"{label}  running ({decision.reason})")
            self.ledger.begin(stage.name, key, stage.settings, upstream)
            started = time.perf_counter()
            finished = stage.run()
            seconds = time.perf_counter() - started
            if not finished:
                result.stages.append(StageOutcome(stage.name, "stopped", decision.reason, seconds))
                echo(f"{label}  stopped after {seconds:.1f} s (as asked); run again to resume it")
                return result
            digests[stage.name] = self.ledger.finish(stage.name, stage.files(), seconds)
            status = "resumed" if decision.action == "resume" else "ran"
            result.stages.append(StageOutcome(stage.name, status, decision.reason, seconds))
            echo(f"{label}  done in {seconds:.1f} s ({stage.artifact})")
        result.eval = json.loads((self.run_dir / "eval.json").read_text())
        return result

    # -- the stages -----------------------------------------------------------------------------------------------
    def _similarity(self) -> bool:
        from ..similarity import similarity_stage

        r, s = self.recipe, self.recipe.similarity
        run = similarity_stage(r.zoo.models, s.data, self.run_dir / "similarity", split=s.split,
                               probe_size=s.probe_size, seed=r.seed, data_root=r.data.root, batch_size=s.batch_size,
                               estimator=s.estimator, token_pool=s.token_pool, debiased=s.debiased,
                               heatmaps=s.heatmaps, progress=self.progress,
                               stop_after=self.stop_after.get("similarity"))
        return run is not None

    def _similarity_files(self) -> list[Path]:
        from ..similarity import load_similarity

        run = load_similarity(self.run_dir / "similarity")
        return [run.directory / "similarity.json", *(run.directory / pair["file"] for pair in run.index["pairs"])]

    def _partition(self) -> bool:
        from ..partition.stage import partition_zoo

        r, p = self.recipe, self.recipe.partition
        partition_zoo(self.run_dir / "similarity", p.k, p.eps, out=self.run_dir / "partition.json",
                      debiased=r.similarity.debiased, size=p.size, stage_aligned=not p.general,
                      similarity=p.similarity, restarts=p.restarts, iterations=p.iterations, seed=r.seed,
                      progress=self.progress)
        return True

    def _search(self) -> bool:
        from ..search.stage import search_stage

        r, s = self.recipe, self.recipe.search
        search_stage(self.run_dir / "partition.json", r.data.target, s.budget.budget(), proxy=s.proxy, top_k=s.top_k,
                     seed=r.seed, batches=s.batches, batch_size=s.batch_size, order=s.order, method=s.method,
                     time_limit=s.time_limit, out=self.run_dir / "search.json", data_root=r.data.root,
                     max_per_class=r.data.max_per_class, max_scored=s.max_scored, probe_size=s.probe_size,
                     own_stems=s.own_stems, progress=self.progress)
        return True

    def _stitch(self) -> bool:
        from ..stitch.stage import stitch_stage

        r, s = self.recipe, self.recipe.stitch
        blocks = json.loads((self.run_dir / "search.json").read_text())["choice"]["blocks"]
        stitch_stage(blocks, r.data.target, self.run_dir / "net", init=s.init, probe_size=s.probe_size, seed=r.seed,
                     stem=s.stem, token_pool=s.token_pool, max_per_class=r.data.max_per_class, data_root=r.data.root,
                     recalibrate_norms=s.recalibrate_norms, head=s.head, overwrite=True, progress=self.progress)
        return True

    def _train(self, mode: str, net_dir: Path | None = None, stop_after: int | None = None) -> bool:
        from ..stitch.training import train_network

        r = self.recipe
        net_dir = net_dir or self.run_dir / "net"
        if stop_after is None and net_dir == self.run_dir / "net":
            stop_after = self.stop_after.get(f"train-{mode}")
        recipe = r.train.recipe()
        summary = train_network(net_dir, r.data.target, mode, recipe=recipe, out=net_dir / f"train-{mode}",
                                seed=r.seed, block_norm=r.train.block_norm, max_per_class=r.data.max_per_class,
                                data_root=r.data.root, progress=self.progress, stop_after=stop_after,
                                head_start=r.train.full_head_start if mode == "full" else "fitted")
        return summary["epochs"] == recipe.epochs

    def _baselines(self) -> bool:
        from .report import zoo_baselines

        record = zoo_baselines(self.recipe, progress=self.progress)
        directory = self.run_dir / "baselines"
        for model in record["models"]:
            if not model["within_budget"]:
                continue
            net_dir = directory / model["name"] / "net"
            if not _intact(net_dir):  # a stitched baseline from an interrupted run is used as it is
                self._stitch_baseline(model["blocks"], net_dir)
            for mode in self.recipe.train.modes:
                self._train(mode, net_dir)
        write_text(directory / "baselines.json", json.dumps(record, indent=1) + "\n")
        return True

    def _stitch_baseline(self, blocks: str, net_dir: Path) -> None:
        from ..stitch.stage import stitch_stage

        r, s = self.recipe, self.recipe.stitch
        stitch_stage(blocks, r.data.target, net_dir, init=s.init, probe_size=s.probe_size, seed=r.seed, stem="none",
                     token_pool=s.token_pool, max_per_class=r.data.max_per_class, data_root=r.data.root,
                     recalibrate_norms=s.recalibrate_norms, head=s.head, overwrite=True, progress=self.progress)

    def _baseline_files(self) -> list[Path]:
        directory = self.run_dir / "baselines"
        record = json.loads((directory / "baselines.json").read_text())
        files = [directory / "baselines.json"]
        for model in record["models"]:
            if model["within_budget"]:
                net_dir = directory / model["name"] / "net"
                files += _net_files(net_dir)
                for mode in self.recipe.train.modes:
                    files += _net_files(net_dir / f"train-{mode}", summary=True)
        return files

    def _eval(self) -> bool:
        from .report import evaluate_run, model_card

        record = evaluate_run(self.recipe, self.run_dir, progress=self.progress)
        write_text(self.run_dir / "eval.json", json.dumps(record, indent=1) + "\n")
        write_text(self.run_dir / "MODEL_CARD.md", model_card(self.recipe, self.run_dir, record, self.command))
        return True


def _net_files(net_dir: Path, summary: bool = False) -> list[Path]:
    files = [net_dir / "structure.json", net_dir / "model.safetensors"]
    return files + [net_dir / "summary.json"] if summary else files


def _intact(net_dir: Path) -> bool:
    """A saved network whose weights are the ones its structure names."""
    from ..stitch.io import read_structure
    from ..io import sha256_of

    try:
        record = read_structure(net_dir)
        return sha256_of(net_dir / record["weights"]["file"]) == record["weights"]["sha256"]
    except (ReassemblyError, OSError, KeyError, TypeError):
        return False
