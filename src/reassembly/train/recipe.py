"""Training recipes as validated data, saved next to every run so that a run can be resumed or repeated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainRecipe(BaseModel):
    """How to train a classifier: optimiser, schedule, regularisation, augmentation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    decay_norm_and_bias: bool = False
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = True
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1)
    # "bf16" runs forward and loss under torch.autocast (convolutions and matmuls in bfloat16, the weights and the
    # optimiser in float32). On a CPU with AVX-512 BF16 it trains ResNets and VGGs about 1.4x faster but depthwise
    # MobileNets slower (benchmarks/bench_train_step.py); results then depend a little more on the machine.
    # Evaluation always runs in float32.
    mixed_precision: Literal["no", "bf16"] = "no"
