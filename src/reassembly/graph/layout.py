"""What a feature tensor looks like relative to the input image: layout, channels and spatial reduction.

Stitching and partitioning compare nodes of different families (CNN maps, NHWC Swin maps, ViT tokens), so every
node states its layout and its reduction (input side / feature side, like timm's ``feature_info``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

MAX_PREFIX_TOKENS = 16  # class / distillation / register tokens that ride along with the patch grid


@dataclass(frozen=True)
class Layout:
    """``format`` is one of nchw, nhwc, tokens (B, N, D), vector (B, D) or other; ``reduction`` is the input height
    over the feature height (patch size for tokens; below 1 for an upsampled map), None where there is no grid.
    ``grid`` is the (height, width) of the feature map or of the patch-token grid, None where there is no grid;
    ``prefix_tokens`` counts the tokens ahead of the grid (class, distillation, register tokens), 0 for maps."""

    format: str
    channels: int | None
    reduction: float | None
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0


def _ratio(image_side: int, feature_side: int) -> float:
    return image_side / feature_side if feature_side else math.inf


def _clean(reduction: float) -> float | int:
    nearest = round(reduction)
    return int(nearest) if abs(reduction - nearest) < 1e-6 else round(reduction, 3)


def _grid_reduction(height: int, width: int, rows: int, cols: int) -> float | None:
    """Reduction when (rows, cols) is a plausible feature grid of a (height, width) image, else None. A grid finer
    than the image (an upsampled map, as in a decoder) has a reduction below 1."""
    if rows < 1 or cols < 1:
        return None
    by_rows, by_cols = _ratio(height, rows), _ratio(width, cols)
    if abs(by_rows - by_cols) > 0.15 * max(by_rows, by_cols):
        return None
    return _clean(by_rows)


def _token_reduction(height: int, width: int, tokens: int) -> float | None:
    """Patch size whose grid, plus at most a few prefix tokens, gives ``tokens`` tokens."""
    for patch in range(1, min(height, width) + 1):
        grid = (height // patch) * (width // patch)
        if height % patch == 0 and width % patch == 0 and grid <= tokens <= grid + MAX_PREFIX_TOKENS:
            return patch
    return None


@lru_cache(maxsize=4096)
def describe(shape: tuple[int, ...] | None, input_size: tuple[int, ...]) -> Layout:
    """Layout of a feature of ``shape`` (without the batch dimension) for a model fed ``input_size`` (C, H, W)."""
    if shape is None:
        return Layout("other", None, None)
    if len(shape) == 1:
        return Layout("vector", shape[0], None)
    if len(input_size) != 3:
        return Layout("other", shape[0], None)
    _, height, width = input_size
    if len(shape) == 3:
        nchw = _grid_reduction(height, width, shape[1], shape[2])
        if nchw is not None:
            return Layout("nchw", shape[0], nchw, (shape[1], shape[2]))
        nhwc = _grid_reduction(height, width, shape[0], shape[1])
        if nhwc is not None:
            return Layout("nhwc", shape[2], nhwc, (shape[0], shape[1]))
    if len(shape) == 2:
        patch = _token_reduction(height, width, shape[0])
        if patch is not None:
            grid = (height // patch, width // patch)
            return Layout("tokens", shape[1], patch, grid, shape[0] - grid[0] * grid[1])
    return Layout("other", None, None)


def grid_cells(shape: tuple[int, ...], layout: Layout) -> int | None:
    """Number of spatial positions (or tokens) in a feature of ``shape`` (without batch) laid out as ``layout``."""
    if layout.format == "nchw":
        return shape[1] * shape[2]
    if layout.format == "nhwc":
        return shape[0] * shape[1]
    if layout.format == "tokens":
        return shape[0]
    return None


def is_spatial(layout: Layout) -> bool:
    """Whether the feature still has a spatial grid or a token axis (as opposed to a pooled vector)."""
    return layout.format in ("nchw", "nhwc", "tokens")
