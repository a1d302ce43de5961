"""`molf_ds.initialize`: deepspeed.initialize with MoLFAdamW as the client optimizer, plus the stage adapter.

Everything that can be wrong with the configs is checked before DeepSpeed starts (see `ds_config.py`);
after the engine exists, `attach` tells the optimizer where the experts lie in the tensors DeepSpeed
hands it and how to reduce scores across data-parallel ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
import deepspeed.comm as dist
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import nn

from ..config import MoLFConfig
from ..optim import MoLFAdamW, RoutingLog, build_optimizer
from ..wrapping import molf_modules, wrap_model
from .ds_config import check_deepspeed_version, prepare_ds_config
from .layouts import copied_param_layouts, zero12_layouts


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
    cfg = molf_config or MoLFConfig()
    ds_config = prepare_ds_config(config)
    if not molf_modules(model):
        wrap_model(model, cfg)
    optimizer = build_optimizer(model, cfg, routing_log)
    with optimizer.paused():  # some wrappers call step() once on zero grads to create state
        engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, lr_scheduler=lr_scheduler, **deepspeed_kwargs
        )
    attach(engine.optimizer, optimizer)
    return engine, ds_optimizer, loader, scheduler


def attach(wrapper: Any, optimizer: MoLFAdamW) -> None:
    """Point `optimizer` at the tensors `wrapper` (DeepSpeed's optimizer) steps, and log skipped steps."""
    index = optimizer.index
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        optimizer.layouts = zero12_layouts(index, wrapper)
        optimizer.reduce_scores = _all_reduce_over(wrapper.dp_process_group)
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


def _all_reduce_over(group: Any):
    device = deepspeed.get_accelerator().current_device_name()

    def reduce(sums: torch.Tensor) -> None:
        on_device = sums.to(device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
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
