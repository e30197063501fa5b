"""``reassembly run``: recipe validation, a tiny recipe end to end (digits, two zoo models), and the run directory's
rules: a second run skips every stage, a corrupt or deleted artifact re-runs its stage and those downstream only, a
changed recipe section re-runs from that stage, and interrupted stages resume. Then the run's HTML report: what it
holds, what it says of stages not yet run, and how it looks in headless Chromium."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil

import pytest
import yaml

from reassembly.errors import ReassemblyError
from reassembly.pipeline import (
    RecipeError,
    demo_path,
    example_text,
    load_recipe,
    run_recipe,
)
from reassembly.pipeline.html_report import markdown_to_html, write_html_report

from .browser import needs_chromium, open_page
from .test_cli import assert_one_line_error, run

TINY = {
    "name": "tiny",
    "data": {"target": "digits", "max_per_class": 5},
    "zoo": "resnet20_cifar5,resnet20_fashion",
    "similarity": {"probe_size": 64, "batch_size": 32, "heatmaps": False},
    "partition": {"k": 2, "restarts": 3, "iterations": 5},
    "search": {"budget": {"params": "0.5M"}, "proxy": "params", "top_k": 2},
    "stitch": {"probe_size": 40},
    "train": {"modes": "frozen", "epochs": 1, "batch_size": 16, "flip": False},
}
STAGES = ["similarity", "partition", "search", "stitch", "train-frozen", "baselines", "eval"]


def tiny(**changes) -> dict:
    """The tiny recipe with ``section=dict`` updates merged in."""
    recipe = copy.deepcopy(TINY)
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


def run_quietly(recipe, out, **options):
    lines: list[str] = []
    result = run_recipe(recipe, out, echo=lines.append, **options)
    return result, lines


def ran(result) -> set[str]:
    return {name for name, status in result.statuses.items() if status != "skipped"}


# -- the recipe ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, needles", [
    ({"search": {"budget": {"params": "0.5M"}, "topk": 3}}, ["search.topk", "unknown key", "top_k"]),
    ({"colour": "blue"}, ["colour: unknown key", "known keys"]),
    ({"search": {"budget": {"params": "0.5M"}, "top_k": "many"}}, ["search.top_k", "integer"]),
    ({"train": {"modes": ["frozen", "sideways"]}}, ["train.modes.1", "'frozen' or 'full'"]),
    ({"train": {"lr": -1}}, ["train.lr", "greater than 0"]),
    ({"search": {"budget": {"params": "half"}}}, ["search.budget.params", "0.5M"]),
    ({"search": {"budget": {}}}, ["search.budget", "at least one bound"]),
    ({"search": {"budget": {"params": "1M", "min_params": "2M"}}}, ["search.budget", "min"]),
    ({"search": {"top_k": 3}}, ["search.budget: Field required"]),
    ({"data": {"max_per_class": 5}}, ["data.target: Field required"]),
    ({"data": {"target": "cifar11"}}, ["data.target", "unknown dataset 'cifar11'"]),
    ({"zoo": "resnet20_cifar5,resnet9000"}, ["zoo.models", "no shipped model named resnet9000"]),
    ({"search": {"budget": {"params": "0.5M"}, "proxy": "nope"}}, ["search.proxy", "unknown proxy 'nope'"]),
])
def test_recipe_errors_name_the_key(change, needles):
    recipe = {**copy.deepcopy(TINY), **change}
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    for needle in needles:
        assert needle in str(error.value), str(error.value)


def test_missing_sections_and_yaml_errors_name_the_file(tmp_path):
    recipe = copy.deepcopy(TINY)
    del recipe["zoo"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"r\.yaml: zoo: Field required"):
        load_recipe(path)
    path.write_text("data: {target: digits\nzoo: x\n")
    with pytest.raises(RecipeError, match=r"r\.yaml is not valid YAML \(line \d+\)"):
        load_recipe(path)
    path.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(["data"])


def test_defaults_are_filled_in_and_the_demo_recipe_is_valid():
    recipe = load_recipe(tiny())
    resolved = recipe.resolved()
    assert resolved["similarity"]["data"] == "digits"  # the probe defaults to the target task
    assert resolved["train"]["lr"] == 1e-3 and resolved["train"]["modes"] == ["frozen"]
    assert resolved["zoo"] == {"models": "resnet20_cifar5,resnet20_fashion"}
    assert load_recipe(resolved).resolved() == resolved  # the resolved recipe is itself a recipe
    demo = load_recipe(demo_path())
    assert demo.name == "demo" and demo.data.target == "cifar10[5:10]" and len(demo.zoo_models) == 8
    assert yaml.safe_load(example_text()) == yaml.safe_load(demo_path().read_text())


# -- a tiny run end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny recipe run once, its similarity stage interrupted after one of its two probe batches first."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    stopped, _ = run_quietly(tiny(), out, stop_after={"similarity": 1})
    assert stopped.statuses == {"similarity": "stopped"} and not stopped.finished
    assert (out / "similarity" / "progress").is_dir()
    result, lines = run_quietly(tiny(), out)
    return out, result, lines


@pytest.fixture
def copy_of(base, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(base[0], out)
    return out


def test_a_tiny_recipe_runs_end_to_end_and_writes_every_artifact(base):
    out, result, lines = base
    assert list(result.statuses) == STAGES
    assert result.statuses["similarity"] == "resumed"  # it went on from the interrupted batch
    assert set(result.statuses.values()) == {"resumed", "ran"}
    for relative in ["recipe.resolved.yaml", "similarity/similarity.json", "partition.json", "partition.png",
                     "search.json", "net/structure.json", "net/model.safetensors", "net/train-frozen/model.safetensors",
                     "net/train-frozen/MODEL_CARD.md", "baselines/baselines.json", "eval.json", "MODEL_CARD.md"]:
        assert (out / relative).is_file(), relative
    assert not (out / "similarity" / "progress").exists()
    assert len(lines) == 2 * len(STAGES) and all("done in" in line for line in lines[1::2])
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["out"] == str(out) and resolved["stitch"]["init"] == "least-squares"
    record = result.eval
    assert record["split"] == "test" and record["images"] == 355
    names = [net["name"] for net in record["networks"]]
    assert names[0] == "reassembled" and set(names[1:]) == {"resnet20_cifar5", "resnet20_fashion"}
    for net in record["networks"]:
        assert set(net["results"]) == {"fit", "frozen"} and 0 <= net["results"]["frozen"]["top1"] <= 100
    search = json.loads((out / "search.json").read_text())
    assert record["networks"][0]["blocks"] == search["choice"]["blocks"]
    card = (out / "MODEL_CARD.md").read_text()
    assert search["choice"]["blocks"] in card and "resnet20_fashion" in card and "recipe.resolved.yaml" in card


def test_a_second_run_skips_every_stage(copy_of):
    before = (copy_of / "eval.json").read_bytes()
    (copy_of / "report.html").unlink()
    result, lines = run_quietly(tiny(), copy_of)
    assert result.statuses == dict.fromkeys(STAGES, "skipped")
    assert all("skipped: up to date" in line for line in lines) and len(lines) == len(STAGES)
    assert (copy_of / "eval.json").read_bytes() == before and result.eval == json.loads(before)
    assert result.report == copy_of / "report.html" and result.report.is_file()  # the report is written anew


def test_a_corrupt_artifact_reruns_its_stage_and_those_downstream_only(copy_of):
    weights, structure = copy_of / "net" / "model.safetensors", copy_of / "net" / "structure.json"
    intact, record = weights.read_bytes(), structure.read_bytes()
    weights.write_bytes(intact[:-100])
    result, lines = run_quietly(tiny(), copy_of)
    assert any("net/model.safetensors is corrupt" in line for line in lines)
    assert weights.read_bytes() == intact  # the stitch is deterministic...
    # ...but records how long it took: stages downstream run again exactly when what they read has changed
    downstream = {"train-frozen", "eval"} if structure.read_bytes() != record else set()
    assert ran(result) == {"stitch", *downstream}
    assert result.statuses["baselines"] == "skipped"  # the zoo baselines do not depend on the search


def test_a_deleted_artifact_reruns_its_stage_and_those_downstream_only(copy_of):
    search, structure = copy_of / "search.json", copy_of / "net" / "structure.json"
    record, net = search.read_bytes(), structure.read_bytes()
    search.unlink()
    result, lines = run_quietly(tiny(), copy_of)
    assert any("search.json is missing" in line for line in lines)
    expected = {"search"}  # and each stage downstream exactly when what it reads was written anew
    if search.read_bytes() != record:
        expected |= {"stitch", "eval"}
    if structure.read_bytes() != net:
        expected |= {"train-frozen", "eval"}
    assert ran(result) == expected
    assert result.statuses["similarity"] == result.statuses["partition"] == result.statuses["baselines"] == "skipped"


def test_a_changed_section_reruns_from_its_stage(copy_of):
    result, _ = run_quietly(tiny(eval={"baselines": False}), copy_of)
    assert ran(result) == {"eval"} and "baselines" not in result.statuses
    assert [net["name"] for net in result.eval["networks"]] == ["reassembled"]
    result, lines = run_quietly(tiny(stitch={"probe_size": 30}, eval={"baselines": False}), copy_of)
    assert ran(result) == {"stitch", "train-frozen", "eval"}  # a new fit: new weights, so training runs again
    assert any("stitch" in line and "running (settings changed: probe_size 40 -> 30)" in line for line in lines)


def test_an_interrupted_training_stage_resumes(copy_of):
    recipe = tiny(train={"epochs": 2}, eval={"baselines": False})
    stopped, lines = run_quietly(recipe, copy_of, stop_after={"train-frozen": 1})
    assert stopped.statuses["train-frozen"] == "stopped" and not stopped.finished
    assert "Unfinished: train-frozen." in stopped.report.read_text()  # the report of a stopped run says so
    assert any("recipe.epochs 1 -> 2" in line for line in lines)
    log = copy_of / "net" / "train-frozen" / "log.jsonl"
    first = log.read_text().splitlines()
    assert len(first) == 1 and not (copy_of / "net" / "train-frozen" / "model.safetensors").exists()
    result, _ = run_quietly(recipe, copy_of)
    assert result.statuses["train-frozen"] == "resumed" and result.finished
    assert log.read_text().splitlines()[0] == first[0] and len(log.read_text().splitlines()) == 2
    assert result.eval["trained"]["frozen"]["epochs"] == 2


def test_outputs_the_run_did_not_write_are_refused(tmp_path):
    out = tmp_path / "run"
    (out / "similarity").mkdir(parents=True)
    with pytest.raises(ReassemblyError, match=r"similarity exists but .* --force"):
        run_quietly(tiny(), out)


# -- the command line --------------------------------------------------------------------------------------------------
def test_run_command_skips_a_finished_run_and_prints_the_comparison(copy_of, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    out = run("run", str(path), "--out", str(copy_of), "--threads", "1").stdout
    assert out.count("skipped: up to date") == len(STAGES)
    assert "reassembled" in out and "zoo resnet20_cifar5" in out and "top-1 frozen 1 ep" in out
    assert "MODEL_CARD.md" in out and "report.html" in out


def test_run_command_errors_help_and_example(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "serach": {}}))
    assert_one_line_error(run("run", str(path), check_ok=False), "bad.yaml, line ", ": serach: unknown key", "search")
    proc = run("run", check_ok=False)
    assert proc.returncode != 0 and "give a RECIPE file, or --demo" in proc.stderr
    example = run("run", "--print-example").stdout
    assert example == demo_path().read_text()
    assert "budget" in run("run", "--help").stdout


# -- the report --------------------------------------------------------------------------------------------------------
SECTIONS = ["recipe", "similarity", "partition", "search", "training", "comparison", "card"]


def embedded_images(page: str) -> list[bytes]:
    """The PNG bytes of every <img> of ``page``; fails on an image that is not an embedded PNG."""
    sources = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert all(source.startswith("data:image/png;base64,") for source in sources), [s[:40] for s in sources]
    return [base64.b64decode(source.split(",", 1)[1]) for source in sources]


def test_the_run_writes_a_self_contained_report(base):
    from PIL import Image

    out, result, _ = base
    assert result.report == out / "report.html"
    page = result.report.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "Not there yet" not in page  # every stage has run
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    # the CKA overview and the one pair (drawn from the matrices: this recipe draws no heatmaps), the partition
    # diagram, the search candidates and the training curves
    images = embedded_images(page)
    assert len(images) == 5
    for png in images:
        width, height = Image.open(io.BytesIO(png)).size
        assert width > 100 and height > 100
    search = json.loads((out / "search.json").read_text())
    assert search["choice"]["blocks"] in page and "resnet20_fashion:1-" in page
    top1 = result.eval["networks"][0]["results"]["frozen"]["top1"]
    assert "<td>zoo resnet20_cifar5</td>" in page and f"{top1:.2f}" in page
    assert "target: digits" in page  # the resolved recipe
    assert "<h2>Parts</h2>" in page and "<strong>" in page  # the model card, rendered


def test_the_report_says_which_stages_have_not_run(copy_of):
    for relative in ["similarity/similarity.json", "partition.json", "partition.png", "search.json", "eval.json",
                     "MODEL_CARD.md", "net/train-frozen/log.jsonl", "baselines"]:
        path = copy_of / relative
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    page = write_html_report(copy_of).read_text()
    for missing in ["similarity/similarity.json", "partition.json", "search.json", "net/train-frozen/log.jsonl",
                    "eval.json", "MODEL_CARD.md"]:
        assert f"Not there yet: {missing} is missing" in page, missing
    assert "<img" not in page and '<section id="recipe">' in page


def test_report_command_writes_where_asked_and_refuses_what_is_not_a_run(base, tmp_path):
    target = tmp_path / "elsewhere" / "page.html"
    proc = run("report", str(base[0]), "--out", str(target))
    assert proc.stdout.strip() == f"wrote {target}" and len(embedded_images(target.read_text())) == 5
    assert_one_line_error(run("report", str(tmp_path), check_ok=False), "is not a run directory",
                          "recipe.resolved.yaml")
    assert_one_line_error(run("report", str(tmp_path / "nowhere"), check_ok=False), "does not exist")


def test_model_card_markdown_becomes_html():
    text = """# Title with `code`

A paragraph
over two lines with **bold** and <b>markup</b>.

| a | b |
|---|---|
| `x` | 2 |

- one item
  continued
- two

```
raw <code>
```
"""
    page = markdown_to_html(text)
    assert "<h1>Title with <code>code</code></h1>" in page
    assert "<p>A paragraph over two lines with <strong>bold</strong> and &lt;b&gt;markup&lt;/b&gt;.</p>" in page
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in page and "<td><code>x</code></td><td>2</td>" in page
    assert "<ul><li>one item continued</li><li>two</li></ul>" in page
    assert "<pre><code>raw &lt;code&gt;</code></pre>" in page


@needs_chromium
def test_the_report_renders_in_a_browser(base, tmp_path):
    seen = open_page(base[0] / "report.html")
    assert len(seen["images"]) == 5
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    assert seen["errors"] == []
    assert seen["requests"] == [(base[0] / "report.html").resolve().as_uri()]  # nothing fetched but the page
    # the check can fail: a page with a broken image and a script error is caught
    broken = tmp_path / "broken.html"
    broken.write_text('<img alt="bad" src="data:image/png;base64,AAAA"><script>undefinedFunction()</script>')
    seen = open_page(broken)
    assert seen["images"] == [("bad", 0)] and seen["errors"]
