"""The end of a run: the zoo baselines within the budget, the scores of every network (``eval.json``), the comparison
table ``reassembly run`` prints, and the reassembled network's ``MODEL_CARD.md``.

A zoo baseline is a shipped model's whole body (every node of its chain but the head) with a new linear head for the
target classes, made by the same stitch stage as the reassembled network (``stem="none"``) and so fitted the same way
(least squares on the same probe images, or PyTorch's default initialisation) and trained by the same training stage
with the same recipe, data and seed: in frozen mode only its new head trains, as only the reassembled network's new
stem, stitches and head do; in full mode everything trains.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..text import format_table, human
from .recipe import Recipe

FORMAT = "reassembly.run.eval/1"
BASELINES_FORMAT = "reassembly.run.baselines/1"
REASSEMBLED = "reassembled"


def _target(recipe: Recipe, split: str = "train", **options):
    from ..data import load_dataset

    return load_dataset(recipe.data.target, split, root=recipe.data.root, **options)


def zoo_baselines(recipe: Recipe, progress: bool = False) -> dict:
    """Every zoo model as its body + a new head for the target: parameters, MACs (and latency when the budget bounds
    it), and whether it is within the search budget."""
    import torch

    from ..measure import count_macs, count_params, measure_latency
    from ..stitch import build_network
    from ..stitch.build import pretrained_block

    budget = recipe.search.budget.budget()
    classes = _target(recipe, max_per_class=1).classes
    models = []
    for name in recipe.zoo_models:
        length = len(pretrained_block(name, 0, 1).chain)
        blocks = f"{name}:0-{length - 1}"
        torch.manual_seed(recipe.seed)
        net = build_network([pretrained_block(name, 0, length - 1)], len(classes), stem="none",
                            token_pool=recipe.stitch.token_pool, classes=list(classes))
        size = tuple(net.structure.input_size)
        costs = {"params": count_params(net), "macs": count_macs(net, size)}
        if "latency" in budget.resources:
            costs["latency"] = round(measure_latency(net.eval(), torch.zeros(1, *size)), 4)
        models.append({"name": name, "blocks": blocks, **costs, "within_budget": budget.admits(costs)})
    return {"format": BASELINES_FORMAT, "budget": budget.to_dict(), "budget_text": budget.describe(),
            "what": "each zoo model's body (its chain without the head node) with a new linear head for the target "
                    "classes, fitted and trained like the reassembled network",
            "models": models}


def _networks(recipe: Recipe, run_dir: Path) -> list[dict]:
    """The networks to score: the reassembled one and each within-budget zoo baseline, before and after training."""
    rows = [{"name": REASSEMBLED, "kind": "reassembled", "dir": "net"}]
    baselines = run_dir / "baselines" / "baselines.json"
    if recipe.eval.baselines and baselines.is_file():
        for model in json.loads(baselines.read_text())["models"]:
            if model["within_budget"]:
                rows.append({"name": model["name"], "kind": "zoo", "dir": f"baselines/{model['name']}/net"})
    return rows


def evaluate_run(recipe: Recipe, run_dir: Path, progress: bool = False) -> dict:
    """Score every network of the run on the target's ``eval.split``; the record ``eval.json`` holds."""
    from ..stitch.io import load_net, read_structure
    from ..train import evaluate

    split = recipe.eval.split
    datasets: dict = {}
    networks = []
    for row in _networks(recipe, run_dir):
        structure = read_structure(run_dir / row["dir"])
        stages = {"fit": row["dir"], **{mode: f"{row['dir']}/train-{mode}" for mode in recipe.train.modes}}
        results = {}
        for stage, directory in stages.items():
            net = load_net(run_dir / directory)
            size = tuple(net.structure.input_size)
            if size not in datasets:
                datasets[size] = _target(recipe, split, image_size=size[1], channels=size[0])
            result = evaluate(net, datasets[size], batch_size=recipe.eval.batch_size, progress=progress)
            results[stage] = {**result.as_dict(), "dir": directory}
        networks.append({**row, "blocks": ",".join(block["spec"] for block in structure["blocks"]),
                         "params": structure["params"], "macs": structure["macs"], "results": results})
    data = next(iter(datasets.values()))
    net_info = read_structure(run_dir / "net")["info"]
    trained = {}
    for mode in recipe.train.modes:
        info = read_structure(run_dir / "net" / f"train-{mode}").get("info", {}).get("trained", {})
        trained[mode] = {"train_images": info.get("train_images"), "epochs": info.get("recipe", {}).get("epochs"),
                         "recipe": info.get("recipe"), "block_norm": info.get("block_norm")}
    search = json.loads((run_dir / "search.json").read_text())
    ranks = {zoo["name"]: zoo.get("rank") for zoo in search.get("zoo_models", [])}
    for net in networks:  # where the search ranked each network (the zoo models are candidates too)
        net["search_rank"] = search["choice"]["rank"] if net["kind"] == "reassembled" else ranks.get(net["name"])
    over = []
    if recipe.eval.baselines and (run_dir / "baselines" / "baselines.json").is_file():
        over = [{key: model[key] for key in ("name", "params", "macs")} for model in
                json.loads((run_dir / "baselines" / "baselines.json").read_text())["models"]
                if not model["within_budget"]]
    return {
        "format": FORMAT,
        "data": data.name,
        "split": split,
        "images": len(data),
        "classes": list(data.classes),
        "budget": search["budget"],
        "budget_text": search["budget_text"],
        "fit": {"method": net_info.get("init", {}).get("method"),
                "probe_images": net_info.get("init", {}).get("probe", {}).get("images")},
        "trained": trained,
        "seed": recipe.seed,
        "scored": search.get("scored"),
        "networks": networks,
        "zoo_over_budget": over,
    }


def _columns(record: dict) -> list[tuple[str, str]]:
    """(stage, column title) in order: the fit, then each training mode."""
    columns = [("fit", "top-1 fit")]
    for mode, info in record["trained"].items():
        columns.append((mode, f"top-1 {mode} {info['epochs']} ep"))
    return columns


def comparison_legend(record: dict) -> list[str]:
    fit = record["fit"]
    how = (f"least squares on {fit['probe_images']:,} target training images" if fit["method"] == "least-squares"
           else "PyTorch's default initialisation")
    lines = [
        ("reassembled: the blocks the search chose (see search.json), joined by new stitches, with a new stem "
         "(unless the first block keeps its model's own) and head; zoo NAME: that shipped model's body (its head "
         "node removed) with a new linear head."),
        *([("search rank: where the search's proxy ranked the network among the scored ones (a zoo model with its "
            "own stem is a candidate too).")] if any(net.get("search_rank") for net in record["networks"]) else []),
        f"top-1 fit: the new parts only fitted ({how}), no gradient step.",
    ]
    for mode, info in record["trained"].items():
        what = ("only the new parts train (reassembled: stem, stitches, head; zoo: the head), blocks frozen"
                if mode == "frozen" else "every weight trains")
        images = f"{info['train_images']:,}" if info.get("train_images") is not None else "the"
        recipe = info.get("recipe") or {}
        epochs = f"{info['epochs']} epoch{'s' if info['epochs'] != 1 else ''}"
        lines.append(f"top-1 {mode}: then {epochs} of {mode} training, {what}; "
                     f"{recipe.get('optimizer', '')} lr {recipe.get('lr')}, batch {recipe.get('batch_size')}, on "
                     f"{images} target training images, seed {record['seed']}.")
    lines.append("Every row: the same data, fit, recipe, epochs and seed; top-1 on all "
                 f"{record['images']:,} {record['split']} images of {record['data']}.")
    if record["zoo_over_budget"]:
        over = ", ".join(f"{m['name']} ({human(m['params'])} params, {human(m['macs'])} MACs)"
                         for m in record["zoo_over_budget"])
        lines.append(f"Zoo models over the budget, not compared: {over}.")
    return lines


def comparison_rows(record: dict) -> tuple[list[str], list[list[str]]]:
    columns = _columns(record)
    ranked = any(net.get("search_rank") for net in record["networks"])
    headers = ["network", "params", "MACs", *(["search rank"] if ranked else []), *(title for _, title in columns)]
    rows = []
    for net in record["networks"]:
        name = REASSEMBLED if net["kind"] == "reassembled" else f"zoo {net['name']}"
        rank = [f"{net['search_rank']} of {record['scored']}" if net.get("search_rank") else "-"] if ranked else []
        rows.append([name, human(net["params"]), human(net["macs"]), *rank,
                     *(f"{net['results'][stage]['top1']:.2f}" for stage, _ in columns)])
    return headers, rows


def comparison_table(record: dict) -> str:
    """The comparison ``reassembly run`` prints at the end: one row per network, and what each row is."""
    headers, rows = comparison_rows(record)
    table = format_table(headers, rows, "l" + "r" * (len(headers) - 1))
    reassembled = next(net for net in record["networks"] if net["kind"] == "reassembled")
    intro = (f"{record['data']} {record['split']} split, {record['images']:,} images; budget: {record['budget_text']}\n"
             f"reassembled blocks: {reassembled['blocks']}")
    legend = [textwrap.fill(line, width=116, subsequent_indent="  ") for line in comparison_legend(record)]
    return "\n".join([intro, table, *legend])


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def selection_text(search: dict) -> str:
    """Which networks a search scored, in words (records before ``selection`` was kept: the program's top k)."""
    if "selection" in search:
        return search["selection"]["text"]
    program = search["program"]
    return (f"the exact 0-1 program's ({program['status']}, gap {program['gap']:.2%}) {search['scored']} best networks "
            f"by their blocks' {search['proxy']['name']} terms")


def zoo_text(search: dict) -> str:
    """Where the zoo models within the budget ranked, as a clause (empty for records without them)."""
    ranked = [f"`{z['name']}` {z['rank']}" for z in search.get("zoo_models", []) if z.get("rank")]
    return f"; the zoo models themselves rank {', '.join(ranked)}" if ranked else ""


def model_card(recipe: Recipe, run_dir: Path, record: dict, command: str) -> str:
    """MODEL_CARD.md of the reassembled network: what it is made of and where each part comes from, its cost and
    accuracy, how it was chosen and trained, and the command that makes it again."""
    from ..stitch.io import load_net, read_structure
    from ..zoo.pretrained import manifest_entry

    net = load_net(run_dir / "net")
    structure = read_structure(run_dir / "net")
    search = json.loads((run_dir / "search.json").read_text())
    partition = json.loads((run_dir / "partition.json").read_text())
    config = partition["config"]
    similarity = json.loads((run_dir / "similarity" / "similarity.json").read_text())["settings"]
    reassembled = next(net for net in record["networks"] if net["kind"] == "reassembled")
    modes = list(record["trained"])
    final = modes[-1] if modes else "fit"
    final_dir = reassembled["results"][final]["dir"]
    size = "x".join(map(str, structure["input_size"]))

    accuracy = "; ".join(
        f"{'**' if stage == final else ''}{reassembled['results'][stage]['top1']:.2f} %{'**' if stage == final else ''}"
        f" {'after the fit' if stage == 'fit' else f'after {stage} training'}" for stage in reassembled["results"])
    sources = []
    parts = []
    for part, what, params in net.parts():
        origin = "new: fitted and trained on the target"
        if part.startswith("stitch") and what == "(none)":
            origin = "none needed: the two blocks are consecutive parts of one model"
        elif part.startswith("block"):
            ref = net.structure.blocks[int(part.split()[1])]
            entry = manifest_entry(ref.source)
            sources.append(ref.source)
            origin = (f"`{ref.source}`: {entry.architecture} trained on `{entry.source_data}` ({entry.epochs} epochs, "
                      f"seed {entry.seed}; {entry.test_accuracy:.2f} % test top-1 on that task)")
        parts.append([part, what.replace("|", "/"), origin, f"{params:,}"])
    chosen = search["choice"]
    chosen_row = next((c for c in search["candidates"] if c["rank"] == chosen["rank"]), {})
    program = search["program"]
    proxy = search["proxy"]["name"]
    score = "-inf" if chosen.get("proxy") is None else f"{chosen['proxy']:.4g}"
    headers, rows = comparison_rows(record)
    training = []
    for mode, info in record["trained"].items():
        shown = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "label_smoothing",
                 "augment", "flip")
        recipe_text = ", ".join(f"{key} {(info.get('recipe') or {}).get(key)}" for key in shown)
        training.append(f"- **{mode}** ({info['train_images']:,} training images, blocks' batch-norm "
                        f"`{info.get('block_norm')}`): {recipe_text}. Log and per-epoch test accuracy: "
                        f"`net/train-{mode}/MODEL_CARD.md`.")
    return f"""# {recipe.name}: a reassembled network for `{record['data']}`

Made by `reassembly run` (DeRy: similarity, partition, search, stitch, train) from blocks of
{len(set(sources))} pretrained zoo models, for the {len(record['classes'])} classes of `{record['data']}`
({', '.join(record['classes'])}).

| | |
|---|---|
| blocks | `{reassembled['blocks']}` |
| parameters | {reassembled['params']:,} |
| MACs | {reassembled['macs']:,} at {size} |
| budget | {record['budget_text']} |
| top-1 on `{record['data']}` {record['split']} ({record['images']:,} images) | {accuracy} |
| weights | `{final_dir}/` (`structure.json` + `model.safetensors`: `reassembly eval --model DIR`, or `reassembly.stitch.io.load_net(DIR)` in Python, without the zoo) |
| seed | {record['seed']} |
| made with | `{command}` |
| again, elsewhere | `reassembly run {run_dir / 'recipe.resolved.yaml'} --out NEW_DIR` |

## Parts

{_markdown_table(['part', 'what', 'from', 'parameters'], parts)}

## How the blocks were chosen

- **Similarity**: {'debiased' if similarity.get('debiased', True) else 'biased'} linear CKA between every node boundary
  of the {len(similarity['models'])} zoo models ({', '.join(similarity['models'])}), on {similarity['probe_size']:,}
  probe images of `{similarity['data']}` {similarity['split']} (seed {similarity['seed']}); `similarity/`.
- **Partition**: every model cut into K = {config['k']} blocks forming {config['k']} equivalence sets
  (eps {config['eps']}, size cap in {config['size']}, best of {config['restarts']} restarts, score
  {partition['score']:.3f}); `partition.json`.
- **Search**: one block per set within the budget, among {program['space']:,} combinations. Scored:
  {selection_text(search)}; each was assembled and ranked by {proxy} on target images. This network ranks
  {chosen['rank']} ({proxy} {score}; surrogate rank {chosen_row.get('program_rank', '?')}){zoo_text(search)};
  `search.json`.
- **Stitch**: new stitches, stem and head, {'fitted by least squares' if record['fit']['method'] == 'least-squares' else 'PyTorch default initialisation'}{f" on {record['fit']['probe_images']:,} target training images" if record['fit']['probe_images'] else ''}; `net/`.

## Training

{chr(10).join(training) if training else 'Not trained: the network is the fitted one (`net/`).'}

## Compared with the zoo under the same budget

{_markdown_table(headers, rows)}

{chr(10).join(f'- {line}' for line in comparison_legend(record))}

## Limitations

- One seed and the recipe's training ({', '.join(f"{mode}: {info['epochs']} epochs" for mode, info in record['trained'].items()) or 'none'});
  the numbers above are this run's, not a mean over seeds.
- The blocks keep what their source models learnt on their own tasks (listed under Parts); the network has seen
  only the target images described above.
"""
