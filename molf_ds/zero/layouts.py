"""Layouts of the flat fp32 tensors DeepSpeed's optimizer wrappers hand to MoLFAdamW, and the score all-reduce.

One function per wrapper; each maps `id(flat tensor)` to the Layout of the experts it holds.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..optim.layout import ExpertIndex, Layout


class TensorLayouts:
    """LayoutSource over a fixed {id(tensor): Layout} map; an unknown tensor is a bug, said plainly."""

    def __init__(self, layouts: dict[int, Layout]) -> None:
        self.layouts = layouts

    def __call__(self, flat: torch.Tensor) -> Layout:
        try:
            return self.layouts[id(flat)]
        except KeyError:
            raise RuntimeError(
                f"MoLF: DeepSpeed handed the optimizer a tensor of shape {tuple(flat.shape)} that no layout "
                "covers; this DeepSpeed optimizer wrapper is not supported by molf_ds"
            ) from None


def copied_param_layouts(index: ExpertIndex, pairs: Iterable[tuple[nn.Parameter, torch.Tensor]]) -> TensorLayouts:
    """Wrappers that keep one fp32 copy per model parameter (DeepSpeed's unfused fp16/bf16 optimizer)."""
    layouts = {}
    for param, copy in pairs:
        layout = index.param_layout(param)
        if layout is not None:
            layouts[id(copy)] = layout
    return TensorLayouts(layouts)


def zero12_layouts(index: ExpertIndex, zero_optimizer) -> TensorLayouts:
    """ZeRO-1/2: each param group is one flat fp32 partition per rank; a parameter overlapping this rank's
    partition carries `_hp_mapping`, whose hp fragment address is its (start, numel) inside the partition."""
    layouts = {}
    for params, flat in zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups):
        segments = []
        for p in params:
            cell, mapping = index.cell_of.get(id(p)), getattr(p, "_hp_mapping", None)
            if cell is not None and mapping is not None:
                address = mapping.get_hp_fragment_address()
                segments.append((address.start, address.numel, cell, index.kind_of[id(p)]))
        layouts[id(flat)] = Layout(segments)
    return TensorLayouts(layouts)


def zero3_layouts(index: ExpertIndex, zero3_optimizer, rank: int) -> TensorLayouts:
    """ZeRO-3: every parameter is partitioned on its own, and sub-group i's flat fp32 tensor concatenates
    this rank's slices (`partition_numel()` each) of its parameters; the last rank's slice ends in padding."""
    layouts = {}
    for params, flat in zip(zero3_optimizer.fp16_groups, zero3_optimizer.fp32_partitioned_groups_flat):
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
