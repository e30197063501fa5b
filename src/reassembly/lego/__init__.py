"""Model LEGO / MDA (model disassembling and assembling): the task-aware component of a trained CNN for a subset of
its classes.

>>> chosen = select_samples(model, load_dataset("cifar10", "train"), per_class=50)       # step 1
>>> contrib = compute_contributions(model, train_set, chosen)                             # step 2, one pass
>>> masks = locate_component(model, contrib, classes=[0, 1, 2], input_size=(3, 32, 32))  # step 3, graph-aware
>>> masks.save("component.json")

Physical extraction, assembly and parameter scaling are not built yet (docs/lego.md).
"""

from .contribution import Contributions, LayerContribution, accumulate_contributions, compute_contributions
from .locate import ALPHA, BETA, ComponentMasks, LayerMask, channel_graph, locate_component
from .samples import SampleSelection, select_samples

__all__ = ["ALPHA", "BETA", "ComponentMasks", "Contributions", "LayerContribution", "LayerMask", "SampleSelection",
           "accumulate_contributions", "channel_graph", "compute_contributions", "locate_component", "select_samples"]
