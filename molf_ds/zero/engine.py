"""`molf_ds.initialize`: deepspeed.initialize with MoLFAdamW as the client optimizer, and `prepare`, the
wrap -> build -> wait sequence that `initialize`, `MoLFTrainer` and `accelerate_prepare` share.

Everything that can be wrong with the configs is checked before DeepSpeed starts (see `ds_config.py`);
after the engine exists, `adapters.attach` gives the optimizer the router of the engine's optimizer wrapper.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import deepspeed
from deepspeed.pipe import PipelineModule
from torch import nn

from ..config import MoLFConfig
from ..optim import MoLFAdamW, RoutingLog, build_optimizer
from ..wrapping import molf_modules, wrap_model
from .adapters import attach
from .ds_config import check_deepspeed_version, no_pipeline, prepare_ds_config


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
    ds_config = prepare_ds_config(config)
    optimizer = prepare(model, molf_config or MoLFConfig(), routing_log, ds_config)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=lr_scheduler, **deepspeed_kwargs
    )
    attach(engine.optimizer, optimizer)
    return engine, ds_optimizer, loader, scheduler


def prepare(
    model: nn.Module,
    cfg: MoLFConfig,
    routing_log: str | Path | RoutingLog | None = None,
    ds_config: dict[str, Any] | None = None,
) -> MoLFAdamW:
    """Wrap `model` (unless it is wrapped already) and build its MoLF optimizer. With a DeepSpeed config (already
    checked by `prepare_ds_config`), experts of a partitioned model are created partitioned, and the optimizer
    waits: it steps once `attach` has given it the router of the engine DeepSpeed builds around it."""
    if not molf_modules(model):
        with _zero3_construction(model, ds_config or {}):
            wrap_model(model, cfg)
    optimizer = build_optimizer(model, cfg, routing_log)
    if ds_config is not None:
        optimizer.detach()
    return optimizer


def _zero3_construction(model: nn.Module, ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """A model built partitioned (deepspeed.zero.Init, or transformers' ZeRO-3 loading) gets its LoRA
    experts created partitioned too."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()
