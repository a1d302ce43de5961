"""One adapter per DeepSpeed optimizer wrapper. Each builds the `Router` that tells MoLFAdamW where the experts
lie in the tensors the wrapper hands it and how the ranks agree on scores:

- `unpartitioned`: DeepSpeed's unfused 16-bit optimizer (fp32 copies of whole parameters);
- `zero12`: ZeRO-1/2 (one flat fp32 partition per param group and rank);
- `zero3`: ZeRO-3 (per-parameter partitions stepped by sub-group; routing deferred until all are in).

Without a wrapper (fp32 without ZeRO) DeepSpeed steps the model's own parameters, as plain PyTorch does.
"""
from __future__ import annotations

from typing import Any

from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from ...optim import MoLFAdamW, ParamLayouts, Router
from . import unpartitioned, zero3, zero12
from ..surface import probe
from .base import one_step_per_call


def attach(wrapper: Any, optimizer: MoLFAdamW) -> None:
    """Give `optimizer` the router of the engine whose optimizer is `wrapper` (DeepSpeed's wrapper, or `optimizer`
    itself when DeepSpeed did not wrap it); from then on it steps."""
    if wrapper is optimizer:
        optimizer.attach(Router(ParamLayouts(optimizer.index)))
        return
    probe(wrapper)
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        router = zero12.router(wrapper, optimizer.index)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        router = zero3.router(wrapper, optimizer)
    elif isinstance(wrapper, FP16_UnfusedOptimizer):
        router = unpartitioned.router(wrapper, optimizer.index)
    else:
        raise NotImplementedError(
            f"molf_ds has no adapter for DeepSpeed's {type(wrapper).__name__}: it runs fp32 at any ZeRO stage, "
            "bf16/fp16 without ZeRO (DeepSpeed's unfused 16-bit optimizer) and bf16/fp16 at ZeRO stage 1, 2 or 3"
        )
    one_step_per_call(wrapper, optimizer)
    optimizer.attach(router)
