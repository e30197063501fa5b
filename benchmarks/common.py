"""What the benchmark scripts share: running their jobs in parallel processes, writing a report folder,
re-estimating batch-norm statistics, and stitching a network whose fit sees only a given training split."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from reassembly.io import write_text


def write_report(directory: str | Path | None, record: dict, markdown: str) -> None:
    """``results.json`` and ``report.md`` into ``directory`` (nothing when it is None), then print the markdown."""
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / "results.json", json.dumps(record, indent=2) + "\n")
        write_text(directory / "report.md", markdown)
    print(markdown)


@torch.no_grad()
def reestimate_batch_norm(model: torch.nn.Module, dataset, batch_size: int = 500) -> None:
    """Replace every batch norm's running mean/variance by their average over one pass of ``dataset`` (its images
    normalised as the model expects); leaves the model in eval mode, each norm with its own momentum."""
    from reassembly.data import Preprocess
    from reassembly.stitch.init import recalibrate_batch_norms
    from reassembly.train.evaluate import resolve_normalization

    preprocess = Preprocess(*resolve_normalization(model, None, None))
    recalibrate_batch_norms(model, (preprocess(dataset.images[i:i + batch_size])
                                    for i in range(0, len(dataset), batch_size)))


@dataclass(frozen=True)
class Job:
    """One run of a benchmark: a name to report, the command that runs it, and the log its output is appended to."""

    name: str
    command: list[str]
    log: Path


def run_processes(jobs: list[Job], width: int, then: Callable[[], list[Job] | None] | None = None) -> list[str]:
    """Run the jobs ``width`` at a time, each in its own process; returns the names of those that failed.
    ``then()``, asked as the jobs finish until it answers, gives more jobs to put at the front of the queue."""
    queue, running, failed = list(jobs), [], []
    while queue or running or then is not None:
        if then is not None and (more := then()) is not None:
            queue[:0], then = list(more), None
        elif then is not None and not queue and not running:
            break
        while queue and len(running) < width:
            job = queue.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a") as log:
                running.append((subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT), job.name))
            print(f"started {job.name}", flush=True)
        time.sleep(1)
        for process, name in list(running):
            if process.poll() is not None:
                running.remove((process, name))
                print(f"finished {name}" if process.returncode == 0 else f"FAILED {name} (exit {process.returncode})",
                      flush=True)
                if process.returncode:
                    failed.append(name)
    return failed


def stitched_on(blocks: str, train, probe_size: int = 1000, seed: int = 0, **init):
    """The network of ``blocks`` for the classes of ``train`` (an ImageDataset), least-squares initialised (the
    library's defaults, or ``init``'s options) on a seeded probe drawn from ``train`` only, as
    ``reassembly stitch`` draws it from its data: for studies that must keep a validation split out of the fit."""
    from reassembly.stitch import build_network, parse_blocks, pretrained_block
    from reassembly.stitch.init import least_squares_init
    from reassembly.stitch.stage import probe_split

    sources = [pretrained_block(name, start, stop) for name, start, stop in parse_blocks(blocks)]
    torch.manual_seed(seed)
    net = build_network(sources, train.num_classes, classes=list(train.classes))
    probe = train.subset(probe_split(len(train), min(probe_size, len(train)), seed)[0])
    report = least_squares_init(net, sources, probe.images, probe.labels, progress=False, **init)
    return net, report


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every resumable benchmark of training runs takes: parallel jobs, threads per job, the report
    folder, rebuilding the report only, and the hidden option that runs one job in a worker process."""
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report", default=None, help="folder for results.json and report.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
