"""Run by tests/test_train.py under torchrun: trains the two-process case of that file and saves this process's
weights beside the run directory (the training loop itself writes from the main process only)."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from test_train import DISTRIBUTED_RECIPE, distributed_case, tiny_model

from reassembly.train import train_classifier

out = Path(sys.argv[1])
stop_after = int(sys.argv[2]) if len(sys.argv) > 2 else None
model, data, test_set = distributed_case()
with_norm = tiny_model()  # batch norm in train mode and dropout: per-process statistics and masks
for name, net in (("run", model), ("norm", with_norm)):
    train_classifier(net, data, test_set, DISTRIBUTED_RECIPE, out / name, seed=4, progress=False, stop_after=stop_after)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(out / f"{name}-rank-{os.environ['RANK']}.safetensors"))
