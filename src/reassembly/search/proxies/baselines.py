"""Size baselines: the network's parameter count and its MACs at its input size, scored as proxies.

**Sign and scale**: higher is better (the "bigger is better" guess that any training-free proxy has to beat); raw
counts. A proxy-quality study reports their rank correlation with accuracy next to the real proxies'.

**Block term**: exact. The network's count is the sum of its blocks', stitches', stem's and head's counts, which
the 0-1 program holds as unary and pair costs, so its objective *is* the score and re-ranking the assembled
candidates changes nothing.
"""

from __future__ import annotations

from torch import nn

from ...measure import count_macs, count_params
from .common import Batch


def params(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None):
    return float(count_params(net)), [float(count_params(p)) for p in parts] if parts else None


def macs(net: nn.Module, batches: list[Batch], parts: list[nn.Module] | None = None):
    size = tuple(batches[0][0].shape[1:])
    return float(count_macs(net, size)), None
