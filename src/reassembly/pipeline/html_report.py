"""``reassembly report``: one self-contained HTML page that shows a run directory to a person.

Reads whatever a run directory holds (see :mod:`.run`): ``recipe.resolved.yaml``, ``stages/*.json``,
``similarity/`` (the CKA matrices, and the heatmaps when the stage drew them), ``partition.json`` and
``partition.png``, ``search.json``, the training logs ``net/train-MODE/log.jsonl`` and the baselines' own,
``eval.json`` and ``MODEL_CARD.md``. Writes ``report.html`` in the run directory: every image is an embedded PNG
(a ``data:`` URI) and the style is inline, so the page needs no network, no script and no other file to be read,
and can be mailed or archived alone.

A section whose artifact is not there yet (a stage that has not run, or was interrupted) says so, so a report of
an unfinished run is still a report. A figure the stage already drew is embedded as it is; one it did not draw is
drawn from the stage's data by the stage's own plotting function.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import re
from pathlib import Path

import yaml

from .. import __version__
from ..errors import ReassemblyError
from ..io import write_text
from ..plots import png_bytes
from ..text import human
from .ledger import STAMPS
from .report import (
    REASSEMBLED,
    comparison_legend,
    comparison_rows,
    selection_text,
    zoo_text,
)
from .run import RESOLVED

REPORT = "report.html"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #f6f6f4; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin-top: 36px; border-bottom: 2px solid #e4e4e0;
     padding-bottom: 4px; } h3 { font-size: 16px; margin-top: 22px; }
.sub { color: #666; margin: 0 0 18px; }
nav { margin: 8px 0 10px; font-size: 14px; } nav a { margin-right: 14px; color: #2a5d9f; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13.5px; }
th, td { border: 1px solid #d8d8d4; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f1f1ee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mark td { background: #fff4d6; font-weight: 600; }
.glance td:first-child { color: #555; white-space: nowrap; }
img { max-width: 100%; height: auto; display: block; margin: 10px 0; border: 1px solid #ececea; }
figure { margin: 14px 0; } figcaption { color: #555; font-size: 13.5px; max-width: 980px; }
pre { background: #f4f4f1; padding: 10px 12px; overflow-x: auto; font-size: 12.5px; line-height: 1.35; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f1ee; padding: 0 3px; }
pre code { background: none; padding: 0; }
pre.yaml { column-count: 3; column-rule: 1px solid #e0e0dc; white-space: pre-wrap; overflow-wrap: anywhere; }
.wide { overflow-x: auto; } td.chosen { background: #fff4d6; font-weight: 600; }
img.overview { max-width: 900px; }
table.fit { table-layout: fixed; width: 100%; } table.fit td { overflow-wrap: anywhere; }
.card h1 { font-size: 21px; } .card h2 { font-size: 17px; border: none; margin-top: 22px; }
.missing { color: #8a5a00; background: #fff8e6; border-left: 4px solid #e0a800; padding: 6px 10px; }
details { margin: 10px 0; } summary { cursor: pointer; color: #2a5d9f; }
.card { border: 1px solid #e4e4e0; padding: 4px 18px 10px; border-radius: 4px; }
.legend li { color: #444; font-size: 13.5px; }
"""


def write_html_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``), atomically; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReassemblyError(f"{run_dir} is not a run directory: it does not exist (give the --out folder of a "
                              "`reassembly run`, e.g. runs/demo)")
    if not (run_dir / RESOLVED).is_file():
        raise ReassemblyError(f"{run_dir} is not a run directory: it has no {RESOLVED} (give the folder a "
                              "`reassembly run` wrote into, e.g. runs/demo)")
    path = Path(out) if out is not None else run_dir / REPORT
    write_text(path, render_report(run_dir))
    return path


def render_report(run_dir: Path) -> str:
    """The page as one HTML string."""
    run = _Run(run_dir)
    name = run.recipe.get("name") or run_dir.name
    # the stages in the order they run, then the card, and the recipe that makes it all again
    sections = [("similarity", "Similarity (CKA)", _similarity), ("partition", "Partition", _partition),
                ("search", "Search", _search), ("training", "Training", _training),
                ("comparison", "Against the zoo", _comparison), ("card", "Model card", _card),
                ("recipe", "Recipe", _recipe)]
    parts = [_glance(run), *(f'<section id="{key}"><h2>{title}</h2>{draw(run)}</section>'
                             for key, title, draw in sections)]
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " ".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(name)}: reassembly run report</title><style>{STYLE}</style></head>\n<body><main>"
            f"<h1>{_e(name)}: reassembly run report</h1>"
            f'<p class="sub">run directory <code>{_e(str(run_dir))}</code>; written {made} by reassembly '
            f"{__version__} (<code>reassembly report {_e(str(run_dir))}</code> writes it again)</p>"
            f"<nav>{nav}</nav>\n" + "\n".join(parts) + "\n</main></body></html>\n")


class _Run:
    """The run directory's artifacts, each read once; ``None`` where a stage has not written its own yet."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.recipe_text = (run_dir / RESOLVED).read_text()
        self.recipe = yaml.safe_load(self.recipe_text) or {}
        self.search = self._json("search.json")
        self.partition = self._json("partition.json")
        self.eval = self._json("eval.json")
        self.similarity = None
        if (run_dir / "similarity" / "similarity.json").is_file():
            from ..similarity import load_similarity

            self.similarity = load_similarity(run_dir / "similarity")
        stamps = sorted((run_dir / STAMPS).glob("*.json")) if (run_dir / STAMPS).is_dir() else []
        self.stages = [json.loads(path.read_text()) for path in stamps]
        order = ["similarity", "partition", "search", "stitch", "train", "baselines", "eval"]
        self.stages.sort(key=lambda s: next((i for i, n in enumerate(order) if s["stage"].startswith(n)), 99))

    def _json(self, relative: str) -> dict | None:
        path = self.dir / relative
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def modes(self) -> list[str]:
        modes = (self.recipe.get("train") or {}).get("modes") or []
        return [modes] if isinstance(modes, str) else list(modes)

    def done(self, stage: str) -> bool:
        return any(s["stage"] == stage and s.get("status") == "done" for s in self.stages)


# -- pieces of HTML ---------------------------------------------------------------------------------------------------
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _missing(what: str, stage: str) -> str:
    return (f'<p class="missing">Not there yet: {_e(what)} is missing, so the {_e(stage)} stage has not finished in '
            f"this run directory. Run <code>reassembly run</code> on it again to go on.</p>")


def _image(png: bytes, alt: str, caption: str = "", kind: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    figcaption = f"<figcaption>{caption}</figcaption>" if caption else ""
    css = f' class="{kind}"' if kind else ""
    return f'<figure><img{css} src="data:image/png;base64,{data}" alt="{_e(alt)}">{figcaption}</figure>'


def _table(headers: list[str], rows: list[list], numeric: str = "", marked: set[int] = frozenset()) -> str:
    """An HTML table; ``numeric`` has an 'r' for each right-aligned column, ``marked`` the rows to highlight."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{_e(c)}</td>' if numeric[i:i + 1] == "r" else f"<td>{_e(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="mark">{cells}</tr>' if index in marked else f"<tr>{cells}</tr>")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


# -- the sections -----------------------------------------------------------------------------------------------------
def _glance(run: _Run) -> str:
    """The run's answer first: what it was for, what it chose, how well it does; then where each stage stands."""
    data = run.recipe.get("data") or {}
    zoo = run.recipe.get("zoo") or {}
    rows = [("target task", f"<code>{_e(data.get('target'))}</code>"),
            ("zoo", _e(zoo.get("models") if isinstance(zoo, dict) else zoo))]
    if run.search:
        choice = run.search["choice"]
        rows.append(("budget", _e(run.search["budget_text"])))
        rows.append(("chosen blocks", f"<code>{_e(choice['blocks'])}</code> ({_e(choice['summary'])})"))
    if run.eval:
        net = next(n for n in run.eval["networks"] if n["kind"] == "reassembled")
        final = list(net["results"])[-1]
        after = "after the fit" if final == "fit" else f"after {final} training"
        where = f"{run.eval['images']:,} images of <code>{_e(run.eval['data'])}</code>"
        top1 = net["results"][final]["top1"]
        rows.append((f"top-1, {run.eval['split']} split", f"<strong>{top1:.2f} %</strong> ({after}, {where})"))
        zoo_rows = [n for n in run.eval["networks"] if n["kind"] == "zoo"]
        if zoo_rows:
            best = max(zoo_rows, key=lambda n: n["results"][final]["top1"])
            rows.append(("best zoo model within the budget",
                         f"{_e(best['name'])}: {best['results'][final]['top1']:.2f} % ({after})"))
    glance = '<table class="glance">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"
    if not run.stages:
        return glance + '<p class="missing">No stage has run in this directory yet.</p>'
    stage_rows = [[s["stage"], "done" if s.get("status") == "done" else "unfinished (resumes on the next run)",
                   f"{s['seconds']:.1f}" if s.get("seconds") is not None else "",
                   s.get("finished", "").replace("T", " ")]
                  for s in run.stages]
    unfinished = [s["stage"] for s in run.stages if s.get("status") != "done"]
    warning = (f'<p class="missing">Unfinished: {_e(", ".join(unfinished))}. The sections of the stages after it may '
               "still show what an earlier run of this directory wrote; run <code>reassembly run</code> on it again "
               "to finish.</p>" if unfinished else "")
    return (glance + "<h3>Stages</h3>" + warning
            + _table(["stage", "status", "seconds", "finished"], stage_rows, "llrl"))


def _recipe(run: _Run) -> str:
    text = run.recipe_text
    return (f"<p>The recipe with every default filled in (<code>{RESOLVED}</code>); "
            f'<code>reassembly run {_e(str(run.dir / RESOLVED))}</code> runs it again.</p><pre class="yaml">{_e(text)}'
            "</pre>")


def _similarity(run: _Run) -> str:
    from ..similarity.plots import overview_figure, pair_figure

    if run.similarity is None:
        return _missing("similarity/similarity.json", "similarity")
    index, settings = run.similarity.index, run.similarity.index["settings"]
    debiased = settings.get("debiased", True)
    intro = (f"<p>{'Debiased' if debiased else 'Biased'} linear CKA between the node boundaries of "
             f"{len(run.similarity.models)} models, on {index['samples']:,} probe images of "
             f"<code>{_e(settings['data'])}</code> ({_e(settings['split'])} split, seed {settings['seed']}, "
             f"{_e(settings.get('estimator', ''))} estimator; {index['seconds']:.1f} s).</p>")
    if not index["pairs"]:
        return intro + "<p>No model pairs to compare.</p>"
    overview = _image(png_bytes(overview_figure(run.similarity, debiased)), "CKA of every model pair",
                      "Every pair at a glance: cell (row A, column B) is the CKA between A's node outputs (rows, "
                      "input side at the top) and B's (columns, input side on the left). A bright diagonal band "
                      "means the two models compute similar things in the same order, which is what lets the "
                      "partition put their blocks in the same equivalence sets.", "overview")
    pairs = []
    for pair in index["pairs"]:
        path = run.similarity.directory / pair["heatmap"] if pair.get("heatmap") else None
        if path is not None and path.is_file():
            png = path.read_bytes()
        else:
            chain_a, chain_b = run.similarity.chain(pair["a"]), run.similarity.chain(pair["b"])
            png = png_bytes(pair_figure(run.similarity.points(pair["a"], pair["b"], debiased), chain_a, chain_b,
                                        f"linear CKA{' (debiased)' if debiased else ''}"))
        pairs.append(_image(png, f"CKA heatmaps of {pair['a']} against {pair['b']}"))
    return (intro + overview + f"<details><summary>{'The pair' if len(pairs) == 1 else f'The {len(pairs)} pairs one by one'}"
            f", node inputs and outputs with node names</summary>{''.join(pairs)}</details>")


def _partition(run: _Run) -> str:
    from ..partition.plots import partition_figure

    record = run.partition
    if record is None:
        return _missing("partition.json", "partition")
    config = record["config"]
    png_path = run.dir / "partition.png"
    if png_path.is_file():
        png = png_path.read_bytes()
    elif run.similarity is not None:
        png = png_bytes(partition_figure(record, {m: run.similarity.chain(m) for m in run.similarity.models}))
    else:
        png = None
    chosen = set(run.search["choice"]["blocks"].split(",")) if run.search else set()
    sets = len(record["sets"])
    rows = []
    for model in record["models"]:
        cells = ["<td></td>"] * sets
        for block in model["blocks"]:
            text = f"{block['start']}-{block['stop']}: {_e(block['name'])} ({human(block['params'])})"
            cells[block["set"]] = (f'<td class="chosen">{text}, chosen</td>' if block["spec"] in chosen
                                   else f"<td>{text}</td>")
        rows.append(f"<tr><td>{_e(model['name'])}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>set {i}</th>" for i in range(sets))
    table = (f'<table class="fit"><thead><tr><th>model</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
             "</table>")
    intro = (f"<p>Every model cut into K = {config['k']} blocks that form {sets} equivalence sets "
             f"({'stage-aligned' if config.get('stage_aligned') else 'general clustering'}, eps {config['eps']}, "
             f"size cap in {config['size']}, best of {config['restarts']} restarts, score {record['score']:.3f}). "
             "The search picks one block per set.</p>")
    figure = (_image(png, "partition diagram", "One row per model, one cell per node: each coloured span is a "
                                               "block, its colour the equivalence set it belongs to, its label its "
                                               "parameters; grey cells are the stem and head, which no set holds.")
              if png else "")
    note = ("<p>A cell <code>A-B: NAMES (PARAMETERS)</code> is the block <code>MODEL:A-B</code>, nodes A to B - 1 of "
            "that model's chain (the cells from A to B in the diagram)"
            + ("; the highlighted blocks make up the network the search chose" if chosen else "") + ".</p>")
    return intro + figure + "<h3>Which nodes fall in which block</h3>" + table + note


def _search(run: _Run) -> str:
    from ..search.plots import candidates_figure

    record = run.search
    if record is None:
        return _missing("search.json", "search")
    program, proxy = record["program"], record["proxy"]
    intro = (f"<p>Scored: {_e(selection_text(record))}, of {program['space']:,} combinations within "
             f"<em>{_e(record['budget_text'])}</em>; each was assembled and ranked by {_e(proxy['name'])} "
             f"({_e(proxy.get('description', ''))}) on target images{_e(zoo_text(record))}.</p>")
    unscored = sum(c.get("proxy") is None for c in record["candidates"])
    caption = ("Each candidate at its parameters and proxy score, labelled with its rank; the star is the choice. "
               + (f"{unscored} candidates the proxy could not score (-inf) are not drawn." if unscored else ""))
    figure = _image(png_bytes(candidates_figure(record)), "search candidates: proxy score against parameters",
                    caption)
    rows, marked = [], set()
    for index, c in enumerate(record["candidates"]):
        score = "-inf" if c.get("proxy") is None else f"{c['proxy']:.4g}"
        rows.append([c["rank"], c["program_rank"], score, human(c["params"]), human(c["macs"]),
                     ",".join(c["blocks"]) + ("" if c.get("within_budget", True) else " (over budget as measured)")])
        if c["rank"] == record["choice"]["rank"]:
            marked.add(index)
    notes = "".join(f"<p>note: {_e(note)}</p>" for note in record.get("notes", []))
    return intro + figure + _table(["rank", "surrogate rank", f"{proxy['name']} score", "params", "MACs", "blocks"], rows,
                                   "rrrrrl", marked) + notes


def _log(directory: Path) -> list[dict] | None:
    path = directory / "log.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _training(run: _Run) -> str:
    from ..train.plots import curves_figure

    if not run.modes:
        return "<p>The recipe trains nothing (<code>train.modes: []</code>): the network is the fitted one.</p>"
    parts = []
    baselines = [n["name"] for n in (run.eval or {}).get("networks", []) if n["kind"] == "zoo"]
    if not baselines and (run.dir / "baselines" / "baselines.json").is_file():
        record = json.loads((run.dir / "baselines" / "baselines.json").read_text())
        baselines = [m["name"] for m in record["models"] if m["within_budget"]]
    fits = {}
    for net in (run.eval or {}).get("networks", []):
        fits[REASSEMBLED if net["kind"] == "reassembled" else f"zoo {net['name']}"] = net["results"]["fit"]["top1"]
    for mode in run.modes:
        parts.append(f"<h3>{_e(mode)} training</h3>")
        logs = {}
        own = _log(run.dir / "net" / f"train-{mode}")
        if own:
            logs[REASSEMBLED] = own
        for name in baselines:
            records = _log(run.dir / "baselines" / name / "net" / f"train-{mode}")
            if records:
                logs[f"zoo {name}"] = records
        if not logs:
            parts.append(_missing(f"net/train-{mode}/log.jsonl", f"train-{mode}"))
            continue
        what = ("only the new parts train (reassembled: stem, stitches and head; zoo models: their new head)"
                if mode == "frozen" else "every weight trains")
        unfinished = "" if run.done(f"train-{mode}") else " The reassembled network's training has not finished."
        parts.append(_image(png_bytes(curves_figure(logs, fits, f"{mode} training: {what}")),
                            f"{mode} training curves",
                            "Per epoch: the training loss, and top-1 on the target's test split (solid) and on "
                            "the augmented training batches (dashed). Epoch 0 is the network after the fit, before "
                            f"any gradient step (from eval.json).{unfinished}"))
    return "".join(parts)


def _comparison(run: _Run) -> str:
    record = run.eval
    if record is None:
        return _missing("eval.json", "eval")
    headers, rows = comparison_rows(record)
    marked = {i for i, net in enumerate(record["networks"]) if net["kind"] == "reassembled"}
    intro = (f"<p>Every network scored on all {record['images']:,} {_e(record['split'])} images of "
             f"<code>{_e(record['data'])}</code>; budget: {_e(record['budget_text'])}.</p>")
    legend = "".join(f"<li>{_e(line)}</li>" for line in comparison_legend(record))
    return intro + _table(headers, rows, "lrr" + "r" * (len(headers) - 3), marked) + f'<ul class="legend">{legend}</ul>'


def _card(run: _Run) -> str:
    path = run.dir / "MODEL_CARD.md"
    if not path.is_file():
        return _missing("MODEL_CARD.md", "eval")
    return f'<div class="card">{markdown_to_html(path.read_text())}</div>'


# -- markdown ---------------------------------------------------------------------------------------------------------
def markdown_to_html(text: str) -> str:
    """The markdown our model cards use: headings, paragraphs, '-' lists (with indented continuation lines), pipe
    tables, fenced code, and inline code, bold and links. Everything else is shown as text, escaped."""
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            index += 1
        elif stripped.startswith("```"):
            end = next((j for j in range(index + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            out.append(f"<pre><code>{_e(chr(10).join(lines[index + 1:end]))}</code></pre>")
            index = end + 1
        elif heading := re.match(r"(#{1,6})\s+(.*)", stripped):
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            index += 1
        elif stripped.startswith("|") and index + 1 < len(lines) and re.fullmatch(r"\|?[\s:|-]+\|?",
                                                                                   lines[index + 1].strip()):
            end = index + 2
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            out.append(_md_table(lines[index], lines[index + 2:end]))
            index = end
        elif re.match(r"[-*]\s", stripped):
            items: list[str] = []
            while index < len(lines) and lines[index].strip():
                current = lines[index].strip()
                if re.match(r"[-*]\s", current):
                    items.append(current[2:])
                elif items:  # a continuation line of the item above
                    items[-1] += " " + current
                index += 1
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
        else:
            paragraph = []
            while index < len(lines) and lines[index].strip() and not _starts_block(lines, index):
                paragraph.append(lines[index].strip())
                index += 1
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(out)


def _starts_block(lines: list[str], index: int) -> bool:
    stripped = lines[index].strip()
    return bool(re.match(r"(#{1,6}\s|```|[-*]\s|\|)", stripped))


def _cells(row: str) -> list[str]:
    row = row.strip()
    return [cell.strip() for cell in row.strip("|").split("|")]


def _md_table(header: str, rows: list[str]) -> str:
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in _cells(header))
    body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in _cells(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escape ``text`` and render `code`, **bold** and [links](url) in it (never inside code)."""
    parts = re.split(r"(`[^`]+`)", text)
    rendered = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            rendered.append(f"<code>{_e(part[1:-1])}</code>")
            continue
        part = _e(part)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', part)
        rendered.append(part)
    return "".join(rendered)
