"""Model LEGO / MDA (model disassembling and assembling): the task-aware component of a trained CNN for a subset of
its classes.

>>> chosen = select_samples(model, load_dataset("cifar10", "train"), per_class=50)       # step 1
>>> contrib = compute_contributions(model, train_set, chosen)                             # step 2, one pass
>>> masks = locate_component(model, contrib, classes=[0, 1, 2], input_size=(3, 32, 32))  # step 3, graph-aware
>>> masks.save("component.json")
>>> small = extract_component(model, masks)                                               # step 4, needs [lego]
>>> save_component(small, "component/")                                                   # safetensors + JSON

Assembly and parameter scaling are not built yet (docs/lego.md). ``reassembly.lego.extract`` imports Torch-Pruning
only when called.
"""

from .contribution import Contributions, LayerContribution, accumulate_contributions, compute_contributions
from .extract import ChannelEmbed, count_params_macs, extract_component, load_component, save_component
from .locate import ALPHA, BETA, ComponentMasks, LayerMask, channel_graph, locate_component
from .samples import SampleSelection, select_samples

__all__ = ["ALPHA", "BETA", "ChannelEmbed", "ComponentMasks", "Contributions", "LayerContribution", "LayerMask",
           "SampleSelection", "accumulate_contributions", "channel_graph", "compute_contributions", "count_params_macs",
           "extract_component", "load_component", "locate_component", "save_component", "select_samples"]
