"""`molf_ds.initialize`: deepspeed.initialize with MoLFAdamW as the client optimizer, plus the stage adapter.

Everything that can be wrong with the configs is checked before DeepSpeed starts (see `ds_config.py`);
after the engine exists, `attach` tells the optimizer where the experts lie in the tensors DeepSpeed
hands it and how to reduce scores across data-parallel ranks.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import nn

from ..config import MoLFConfig
from ..optim import MoLFAdamW, RoutingLog, build_optimizer
from ..optim.layout import LORA
from ..optim.molf_adamw import ScoreReducer
from ..wrapping import molf_modules, wrap_model
from .ds_config import check_deepspeed_version, no_pipeline, prepare_ds_config
from .layouts import copied_param_layouts, zero3_layouts, zero12_layouts


def initialize(
    model: nn.Module,
    molf_config: MoLFConfig | None = None,
    config: dict[str, Any] | str | Path | None = None,
    lr_scheduler: Any = None,
    routing_log: str | Path | RoutingLog | None = None,
    **deepspeed_kwargs: Any,
):
    """Like `deepspeed.initialize`, with MoLF as the optimizer: returns (engine, optimizer, dataloader, scheduler).

    `model` is a transformers model (wrapped here) or one already wrapped by `wrap_model`; `config` is a
    DeepSpeed config dict or JSON path without an "optimizer" block.
    """
    check_deepspeed_version()
    if isinstance(model, PipelineModule):
        raise no_pipeline("molf_ds.initialize got a deepspeed PipelineModule", "pass the model itself")
    cfg = molf_config or MoLFConfig()
    ds_config = prepare_ds_config(config)
    if not molf_modules(model):
        with zero3_construction(model, ds_config):
            wrap_model(model, cfg)
    optimizer = build_optimizer(model, cfg, routing_log)
    optimizer.paused = True  # some wrappers call step() once on zero grads to create state
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=lr_scheduler, **deepspeed_kwargs
    )
    attach(engine.optimizer, optimizer)
    return engine, ds_optimizer, loader, scheduler


def zero3_construction(model: nn.Module, ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """A model built partitioned (deepspeed.zero.Init, or transformers' ZeRO-3 loading) gets its LoRA
    experts created partitioned too."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def attach(wrapper: Any, optimizer: MoLFAdamW) -> None:
    """Point `optimizer` at the tensors `wrapper` (DeepSpeed's optimizer) steps, log skipped steps, and
    let it step (it is paused while DeepSpeed sets up)."""
    index = optimizer.index
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        optimizer.layouts = zero12_layouts(index, wrapper)
        optimizer.reduce_scores = _all_reduce_over(wrapper.dp_process_group)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        optimizer.layouts = zero3_layouts(index, wrapper, dist.get_rank(group=wrapper.dp_process_group))
        optimizer.reduce_scores = _all_reduce_over(wrapper.dp_process_group)
        experts = [p for cell in index.params_by_cell.values() for p in cell if index.kind_of[id(p)] == LORA]
        _keep_resident(wrapper, experts)
        _route_after_all_sub_groups(wrapper, optimizer)
    elif isinstance(wrapper, FP16_UnfusedOptimizer):
        pairs = ((p, c) for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups) for p, c in zip(lp, hp))
        optimizer.layouts = copied_param_layouts(index, pairs)
    elif wrapper is not optimizer:
        raise NotImplementedError(
            f"molf_ds does not support DeepSpeed's {type(wrapper).__name__} yet: use fp32, or bf16/fp16 with "
            "ZeRO stage 1 or 2"
        )
    if wrapper is not optimizer:
        _hook_wrapper_step(wrapper, optimizer)
    optimizer.paused = False


def _route_after_all_sub_groups(zero3: DeepSpeedZeroOptimizer_Stage3, optimizer: MoLFAdamW) -> None:
    """ZeRO-3 steps the wrapped optimizer one sub-group at a time. MoLF lets DeepSpeed's loop run as is
    (grads flattened, unscaled and clipped by DeepSpeed) but only gathers moments and scores in it; the
    winners' update and the copy of MoLF sub-groups back into the model run once every sub-group is in.
    Then the persistent parameters, the resident experts among them, are re-gathered in one collective per
    dtype (DeepSpeed's own re-gather in `_post_step` takes one per tensor)."""
    optimizer.defer_routing = True
    molf_groups = {g for g, group in enumerate(optimizer.param_groups) if group["kind"] == "molf"}
    molf_sub_groups = {s for s, g in zero3.sub_group_to_group_id.items() if g in molf_groups}
    copy_back = zero3._reassign_or_swap_out_partitioned_parameters
    post_step = zero3._post_step
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
        _gather_coalesced(zero3, zero3.persistent_parameters)
        return post_step(*args, **kwargs)

    zero3._reassign_or_swap_out_partitioned_parameters = copy_back_after_routing
    zero3._post_step = route_then_post_step


def _keep_resident(zero3: DeepSpeedZeroOptimizer_Stage3, params: list[nn.Parameter]) -> None:
    """Replicate LoRA experts (small) instead of gathering them for every forward: persistent parameters
    stay gathered, and are re-gathered after each step."""
    persistent = zero3.persistent_parameters  # shared with the parameter offload coordinator
    new = [p for p in params if not p.ds_persist]
    for p in new:
        p.ds_persist = True
    persistent.extend(new)
    if new:
        new[0].all_gather(new)


def _gather_coalesced(zero3: DeepSpeedZeroOptimizer_Stage3, params: list[nn.Parameter]) -> None:
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


def _all_reduce_over(group: Any) -> ScoreReducer:
    """The routing all-reduce. On CPU the rank polls for it (yielding its core) instead of blocking: a blocked
    rank's core goes idle and wakes late, which cost 17 ms of a 62 ms optimizer step on the 2-vCPU test VM."""
    device = deepspeed.get_accelerator().current_device_name()

    def reduce(sums: torch.Tensor) -> None:
        on_device = sums.to(device)
        work = dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group, async_op=True)
        if on_device.device.type == "cpu":
            while not work.is_completed():
                os.sched_yield()
        work.wait()
        if on_device is not sums:
            sums.copy_(on_device)

    return reduce


def _hook_wrapper_step(wrapper: Any, optimizer: MoLFAdamW) -> None:
    """One wrapper step is one MoLF step, however many inner calls it makes; a step DeepSpeed skipped
    (fp16 overflow, inf/NaN grads) is recorded in the routing log."""
    inner_step = wrapper.step

    def step(*args: Any, **kwargs: Any) -> Any:
        before = optimizer.molf_step
        with optimizer.grouped_step():
            result = inner_step(*args, **kwargs)
        if optimizer.molf_step == before:
            optimizer.record_skipped_step()
        return result

    wrapper.step = step
