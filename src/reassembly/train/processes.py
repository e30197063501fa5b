"""The processes launched together by ``accelerate launch`` or ``torchrun``, joined into one accelerate run."""

from __future__ import annotations

import atexit
import os

import torch

from ..errors import ReassemblyError


def join_processes():
    """accelerate's state of this run, its process group initialised when several processes were launched.

    accelerate joins processes on a machine without a CUDA GPU only when told to (``accelerate launch --cpu`` tells
    it, ``torchrun`` does not) and would otherwise run each as a separate whole run; here it is told. The process
    group is taken down when the process exits.
    """
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=launched > 1 and not torch.cuda.is_available())
    if state.num_processes != launched:
        raise ReassemblyError(
            f"{launched} processes were launched but accelerate sees {state.num_processes}; launch with "
            "`accelerate launch --num_processes N` (with --cpu on a machine without a GPU) or torchrun"
        )
    atexit.unregister(_leave)  # once, however often the processes are joined
    atexit.register(_leave)
    return state


def _leave() -> None:
    """Take the process group down before the interpreter does: a gloo group left to the interpreter's teardown
    aborts some exits ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
