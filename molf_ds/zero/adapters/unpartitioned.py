"""No partitioning: DeepSpeed's unfused 16-bit optimizer keeps one fp32 copy per model parameter and steps those."""
from __future__ import annotations

from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

from ...optim.layout import ExpertIndex
from ...optim.molf_adamw import Router
from .base import TensorLayouts


def router(wrapper: FP16_UnfusedOptimizer, index: ExpertIndex) -> Router:
    """Each fp32 copy takes the layout of the parameter it copies; every rank holds whole experts: no reduction."""
    layouts = {}
    for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups):
        for param, copy in zip(low, high):
            layout = index.param_layout(param)
            if layout is not None:
                layouts[id(copy)] = layout
    return Router(TensorLayouts(layouts))
