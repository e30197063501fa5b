"""Model LEGO / MDA (model disassembling and assembling): the task-aware component of a trained CNN for a subset of
its classes, and classifiers assembled from components of different models, without training.

>>> chosen = select_samples(model, load_dataset("cifar10", "train"), per_class=50)       # step 1
>>> contrib = compute_contributions(model, train_set, chosen)                             # step 2, one pass
>>> masks = locate_component(model, contrib, classes=[0, 1, 2], input_size=(3, 32, 32))  # step 3, graph-aware
>>> small = extract_component(model, masks, dataset="cifar10")                            # step 4, needs [lego]
>>> save_component(small, "component/")                                                   # safetensors + JSON
>>> both = assemble([small, other_small])                                                 # step 5, parallel
>>> save_assembly(both, "merged/")

``calibrate_thresholds`` picks alpha/beta on held-out training images instead of the paper's values; ``scale_head``
is MDA's parameter scaling; ``draw_routes`` and ``compression_report`` describe a component; ``disassemble`` and
``assemble_components`` are what ``reassembly disassemble|assemble`` run (docs/lego.md). Torch-Pruning is imported
only when a component is extracted or rebuilt.
"""

from .assemble import Assembly, assemble, load_assembly, merge_block_diagonal, save_assembly, scale_head
from .calibrate import GRID, Calibration, calibrate_thresholds, held_out_indices, mask_cost, masked_logits
from .contribution import Contributions, LayerContribution, accumulate_contributions, compute_contributions
from .extract import ChannelEmbed, count_params_macs, extract_component, load_component, save_component
from .locate import ALPHA, BETA, ComponentMasks, LayerMask, channel_graph, locate_component
from .report import compression_report, draw_routes, report_markdown
from .samples import SampleSelection, select_samples
from .stage import assemble_components, disassemble


def load_lego(directory):
    """A component (component.json) or an assembly (assembly.json) saved in ``directory``."""
    from pathlib import Path

    if (Path(directory) / "assembly.json").is_file():
        return load_assembly(directory)
    return load_component(directory)


__all__ = ["ALPHA", "BETA", "GRID", "Assembly", "Calibration", "ChannelEmbed", "ComponentMasks", "Contributions",
           "LayerContribution", "LayerMask", "SampleSelection", "accumulate_contributions", "assemble",
           "assemble_components", "calibrate_thresholds", "channel_graph", "compression_report",
           "compute_contributions", "count_params_macs", "disassemble", "draw_routes", "extract_component",
           "held_out_indices", "load_assembly", "load_component", "load_lego", "locate_component", "mask_cost",
           "masked_logits", "merge_block_diagonal", "report_markdown", "save_assembly", "save_component", "scale_head",
           "select_samples"]
