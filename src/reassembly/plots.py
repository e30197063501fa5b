"""What every figure of the package shares: matplotlib on the Agg backend (no display is needed or used), and a
figure written as PNG either atomically to a file (a stage's artifact) or to bytes (embedded in a report)."""

from __future__ import annotations

import io
from pathlib import Path

from .io import atomic_path

DPI = 110


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported only when a figure is drawn (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``figure`` to ``path`` as a PNG, whole or not at all, and free it (also when writing fails)."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(figure)
    return Path(path)


def png_bytes(figure, dpi: int = DPI) -> bytes:
    """``figure`` as PNG bytes, and free it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(figure)
    return buffer.getvalue()
