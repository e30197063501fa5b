"""``reassembly run``: a whole DeRy reassembly from one YAML recipe, as a pipeline of resumable stages.

Reads: a recipe (:mod:`.recipe`: the target task, the zoo, the budget and every stage's settings).
Writes, into one run directory, each stage's usual artifact (``similarity/``, ``partition.json``, ``search.json``,
``net/``, ``net/train-MODE/``, ``baselines/``, ``eval.json``), the resolved recipe (``recipe.resolved.yaml``) and the
reassembled network's ``MODEL_CARD.md`` (:mod:`.run`), and the whole run on one self-contained page, ``report.html``
(:mod:`.html_report`). Running it again skips what is done, re-runs what changed and resumes what was interrupted
(:mod:`.ledger`).

>>> result = run_recipe("recipe.yaml", out="runs/mine")
>>> result.statuses          # {'similarity': 'ran', 'partition': 'ran', ...}; 'skipped' on a second call
"""

from .html_report import write_html_report
from .recipe import Recipe, RecipeError, demo_path, example_text, load_recipe
from .run import RunResult, StageOutcome, run_recipe

__all__ = ["Recipe", "RecipeError", "RunResult", "StageOutcome", "demo_path", "example_text", "load_recipe",
           "run_recipe", "write_html_report"]
