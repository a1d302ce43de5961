"""Re-gather ZeRO-3 parameters in one collective per dtype and process group instead of one per tensor."""
from __future__ import annotations

from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from torch import nn


def gather_coalesced(zero3: DeepSpeedZeroOptimizer_Stage3, params: list[nn.Parameter]) -> None:
    """All-gather the partitions of `params` that DeepSpeed released, one collective per dtype and process group
    (DeepSpeed's `_post_step` takes one per tensor), and mark them available so that DeepSpeed skips them. Left
    to DeepSpeed with hierarchical partitioning (ZeRO++ hpZ); ZeRO++ quantization is refused (ds_config.py)."""
    if zero3.zero_hpz_partition_size > 1:
        return
    buckets: dict[tuple[torch.dtype, Any], list[nn.Parameter]] = {}
    for p in params:
        if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            buckets.setdefault((p.ds_tensor.dtype, p.ds_process_group), []).append(p)
    device = deepspeed.get_accelerator().current_device_name()
    for (dtype, group), stale in buckets.items():
        world = dist.get_world_size(group=group)
        local = torch.cat([p.ds_tensor.data.view(-1).to(device) for p in stale])
        gathered = torch.empty(world * local.numel(), dtype=dtype, device=device)
        dist.all_gather_into_tensor(gathered, local, group=group)
        by_rank = gathered.view(world, -1)
        offset = 0
        for p in stale:
            width = p.ds_tensor.ds_numel  # this rank's partition, padding included
            p.data = by_rank[:, offset:offset + width].reshape(-1)[:p.ds_numel].view(p.ds_shape)  # a copy of its own
            p.ds_status = ZeroParamStatus.AVAILABLE
            offset += width
