"""ZeRO-1/2: each param group is one flat fp32 partition per rank, stepped in one call per group."""
from __future__ import annotations

from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from ...optim.layout import ExpertIndex, Layout
from ...optim.molf_adamw import Router
from .base import TensorLayouts, all_reduce_over


def router(wrapper: DeepSpeedZeroOptimizer, index: ExpertIndex) -> Router:
    """A parameter overlapping this rank's partition carries `_hp_mapping`, whose hp fragment address is its
    (start, numel) inside the partition. Each rank holds a slice of the experts: scores are summed over ranks."""
    layouts = {}
    for params, flat in zip(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups):
        segments = []
        for p in params:
            cell, mapping = index.cell_of.get(id(p)), getattr(p, "_hp_mapping", None)
            if cell is not None and mapping is not None:
                address = mapping.get_hp_fragment_address()
                segments.append((address.start, address.numel, cell, index.kind_of[id(p)]))
        layouts[id(flat)] = Layout(segments)
    return Router(TensorLayouts(layouts), all_reduce_over(wrapper.dp_process_group))
