"""ZeRO-3: every parameter is partitioned on its own and DeepSpeed steps the optimizer one sub-group at a time.

MoLF lets DeepSpeed's loop run as is (grads flattened, unscaled and clipped by DeepSpeed) but only scores in it
(a deferred router); the winners' update, and the copy of MoLF sub-groups back into the model, run once every
sub-group is in. The LoRA experts (small) stay gathered on every rank instead of being gathered for each forward.
"""
from __future__ import annotations

from typing import Any

import deepspeed.comm as dist
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from torch import nn

from ...optim import MoLFAdamW, Router
from ...optim.layout import ExpertIndex, Layout
from ...optim.routing import LORA_KINDS
from ..regather import gather_coalesced
from .base import TensorLayouts, all_reduce_over


def router(wrapper: DeepSpeedZeroOptimizer_Stage3, optimizer: MoLFAdamW) -> Router:
    index = optimizer.index
    experts = [p for cell in index.params_by_cell.values() for p in cell if index.kind_of[id(p)] in LORA_KINDS]
    _keep_resident(wrapper, experts)
    _route_after_all_sub_groups(wrapper, optimizer)
    rank = dist.get_rank(group=wrapper.dp_process_group)
    return Router(_layouts(index, wrapper, rank), all_reduce_over(wrapper.dp_process_group), deferred=True)


def _layouts(index: ExpertIndex, wrapper: DeepSpeedZeroOptimizer_Stage3, rank: int) -> TensorLayouts:
    """Sub-group i's flat fp32 tensor concatenates this rank's slices (`partition_numel()` each) of its
    parameters; the last rank's slice ends in padding."""
    layouts = {}
    for params, flat in zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat):
        segments, offset = [], 0
        for p in params:
            part = p.partition_numel()
            cell = index.cell_of.get(id(p))
            if cell is not None:
                owned = max(0, min(part, p.ds_numel - rank * part))  # padding excluded
                segments.append((offset, owned, cell, index.kind_of[id(p)]))
            offset += part
        layouts[id(flat)] = Layout(segments)
    return TensorLayouts(layouts)


def _route_after_all_sub_groups(wrapper: DeepSpeedZeroOptimizer_Stage3, optimizer: MoLFAdamW) -> None:
    """Hold back the copy of MoLF sub-groups into the model until routing is done, then re-gather the persistent
    parameters (the resident experts among them) in one collective per dtype (`regather.py`)."""
    molf_groups = {g for g, group in enumerate(optimizer.param_groups) if group["kind"] == "molf"}
    molf_sub_groups = {s for s, g in wrapper.sub_group_to_group_id.items() if g in molf_groups}
    copy_back = wrapper._reassign_or_swap_out_partitioned_parameters
    post_step = wrapper._post_step
    waiting: list[int] = []

    def copy_back_after_routing(sub_group_id: int) -> None:
        if sub_group_id in molf_sub_groups:
            waiting.append(sub_group_id)
        else:
            copy_back(sub_group_id)

    def route_then_post_step(*args: Any, **kwargs: Any) -> Any:
        optimizer.finish_routing()
        for sub_group_id in waiting:
            copy_back(sub_group_id)
        waiting.clear()
        gather_coalesced(wrapper, wrapper.persistent_parameters)
        return post_step(*args, **kwargs)

    wrapper._reassign_or_swap_out_partitioned_parameters = copy_back_after_routing
    wrapper._post_step = route_then_post_step


def _keep_resident(wrapper: DeepSpeedZeroOptimizer_Stage3, params: list[nn.Parameter]) -> None:
    """Replicate LoRA experts (small) instead of gathering them for every forward: persistent parameters
    stay gathered, and are re-gathered after each step."""
    persistent = wrapper.persistent_parameters  # shared with the parameter offload coordinator
    new = [p for p in params if not p.ds_persist]
    for p in new:
        p.ds_persist = True
    persistent.extend(new)
    if new:
        new[0].all_gather(new)
