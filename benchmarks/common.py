"""What the benchmark scripts share: writing a report folder (results.json + report.md) atomically."""

from __future__ import annotations

import json
from pathlib import Path

from reassembly.io import write_text


def write_report(directory: str | Path | None, record: dict, markdown: str) -> None:
    """``results.json`` and ``report.md`` into ``directory`` (nothing when it is None), then print the markdown."""
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / "results.json", json.dumps(record, indent=2) + "\n")
        write_text(directory / "report.md", markdown)
    print(markdown)
