"""reassembly: build new neural networks out of the parts of pretrained ones."""

from .checkpoint import load_into, read_state_dict, save_checkpoint
from .data import load_dataset
from .errors import CheckpointError, DatasetError, ReassemblyError, UnknownModelError
from .measure import count_macs, count_params
from .zoo import create_model, list_models, model_info

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "DatasetError", "ReassemblyError", "UnknownModelError", "count_macs", "count_params",
    "create_model", "list_models", "load_dataset", "load_into", "model_info", "read_state_dict", "save_checkpoint",
]
