"""One DeepSpeed engine setup for every method: molf and molf-e through `molf_ds.initialize`; the baselines
(fft, lora and adalora through PEFT) through `deepspeed.initialize` with torch AdamW, the same DeepSpeed
config checks, the same LR schedule and the same checkpoint calls."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from torch import nn

from molf_ds import zero
from molf_ds.wrapping import decays, merge_and_unwrap, wrap_model
from molf_ds.zero.ds_config import check_deepspeed_version, prepare_ds_config

from ..methods import REGISTRY, is_molf
from .config import TrainConfig, key_error


class Trainee:
    """A DeepSpeed engine plus what differs between methods."""

    def __init__(self, engine: Any, method: str) -> None:
        self.engine = engine
        self.method = method

    @property
    def is_molf(self) -> bool:
        return is_molf(self.method)

    def routing_shares(self) -> dict[str, Any] | None:
        """{"routing": share of MoLF modules each expert won at the last optimizer step, "routing_by_type": the
        same per projection type}; None for baselines."""
        optimizer = self.engine.basic_optimizer
        if not self.is_molf or optimizer.last_winners is None:
            return None
        return {"routing": optimizer.routing_shares(), "routing_by_type": optimizer.routing_shares_by_type()}

    def kernel_backend(self) -> str | None:
        """Which kernels step the MoLF experts ("cpp", "triton" or "torch", molf_ds.optim.kernels), once stepped."""
        return self.engine.basic_optimizer.kernel_backend if self.is_molf else None

    def before_step(self, step: int) -> None:
        """Called on every rank after the last backward of optimizer step `step`, before engine.step()."""

    def close(self) -> None:
        """Close the routing log (molf, molf-e)."""
        log = getattr(self.engine.basic_optimizer, "routing_log", None) if self.is_molf else None
        if log is not None:
            log.close()

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        if self.is_molf:
            zero.save_checkpoint(self.engine, directory, tag, client_state)
        else:
            self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        if self.is_molf:
            path, state = zero.load_checkpoint(self.engine, directory, tag)
        else:
            path, state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {directory}")
        return dict(state or {})


class AdaLoraTrainee(Trainee):
    def kernel_backend(self) -> str | None:
        """Which kernels step the MoLF experts ("cpp", "triton" or "torch", molf_ds.optim.kernels), once stepped."""
        return self.engine.basic_optimizer.kernel_backend if self.is_molf else None

    def before_step(self, step: int) -> None:
        """PEFT's rank allocation reads p.grad and masks lora_E in place. Under ZeRO-1/2 the grads live in
        DeepSpeed's partitions and the optimizer steps fp32 copies: lend the full grads, then copy the masked
        values into the fp32 partitions."""
        from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

        model = self.engine.module
        params = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        lent = []
        for _, p in params:  # every rank, same order: safe_get_full_grad all-reduces under ZeRO
            if p.grad is None:
                p.grad = safe_get_full_grad(p).to(p.dtype)
                lent.append(p)
        model.base_model.update_and_allocate(step)
        for p in lent:
            p.grad = None
        for name, p in params:
            if "lora_E" in name:
                safe_set_full_fp32_param(p, p.data)


def build(cfg: TrainConfig, model: nn.Module, total_steps: int, routing_log: Path) -> Trainee:
    """The engine for `cfg.method` over `model` (a transformers model, not yet wrapped)."""
    schedule = _scheduler(cfg, total_steps)
    spec = REGISTRY[cfg.method]
    if spec.molf:
        engine, *_ = zero.initialize(model, cfg.molf_config(), cfg.deepspeed, lr_scheduler=schedule,
                                     routing_log=routing_log)
        return Trainee(engine, cfg.method)
    t = cfg.train
    if spec.peft:
        model = peft_model(cfg, model, total_steps)
        lr, weight_decay = t.lora_lr, t.lora_weight_decay
    else:
        lr, weight_decay = t.lr, t.weight_decay
    check_deepspeed_version()
    decay = [p for p in model.parameters() if p.requires_grad and decays(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not decays(p)]  # biases, norms
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    if spec.trains_rest:
        groups += rest_groups(model, t.lr, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(t.betas), eps=t.eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=prepare_ds_config(cfg.deepspeed),
                                      lr_scheduler=schedule)
    return (AdaLoraTrainee if spec.adapter == "adalora" else Trainee)(engine, cfg.method)


def shaped_model(cfg: TrainConfig, model: nn.Module, total_steps: int | None = None) -> nn.Module:
    """`model` (a transformers model) with the parameters `cfg.method` adds, as its checkpoints hold them: MoLF's
    experts (MoLFLinear), a PEFT adapter, or none; lora-rest's other parameters set trainable. `total_steps`
    None: AdaLoRA's schedule from lora.tinit and lora.tfinal (it shapes nothing)."""
    spec = REGISTRY[cfg.method]
    if spec.molf:
        return wrap_model(model, cfg.molf_config())
    if not spec.peft:
        return model
    if total_steps is None:
        total_steps = cfg.train.max_steps or cfg.lora.tinit + cfg.lora.tfinal + 1
    model = peft_model(cfg, model, total_steps)
    if spec.trains_rest:
        rest_groups(model, cfg.train.lr, cfg.train.weight_decay)
    return model


def merged_model(method: str, model: nn.Module) -> nn.Module:
    """A `shaped_model` folded into the vanilla transformers architecture (experts and adapters merged into W)."""
    spec = REGISTRY[method]
    if spec.molf:
        return merge_and_unwrap(model)
    return model.merge_and_unload() if spec.peft else model


def peft_model(cfg: TrainConfig, model: nn.Module, total_steps: int) -> nn.Module:
    """`model` with the PEFT adapter of `cfg.method` (LoRA or AdaLoRA over `total_steps`) on lora.target_modules."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    lo = cfg.lora
    common = dict(lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                  task_type="CAUSAL_LM")
    if REGISTRY[cfg.method].adapter == "lora":
        peft_config = LoraConfig(r=lo.r, use_rslora=lo.use_rslora, **common)
    elif lo.tinit >= total_steps - lo.tfinal:
        raise key_error("lora.tinit", f"AdaLoRA needs lora.tinit < total steps ({total_steps}) - lora.tfinal")
    else:
        peft_config = AdaLoraConfig(init_r=lo.init_r, target_r=lo.target_r, tinit=lo.tinit, tfinal=lo.tfinal,
                                    deltaT=lo.delta_t, orth_reg_weight=lo.orth_reg_weight, total_step=total_steps,
                                    **common)
    return get_peft_model(model, peft_config)


def rest_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """lora-rest: the parameters outside the LoRA-wrapped layers (embeddings, norms, lm_head, ...) train with
    plain AdamW at the full lr and weight decay (none on biases and norms), as MoLF trains them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {id(p) for m in model.modules() if isinstance(m, BaseTunerLayer) for p in m.parameters()}
    rest = [p for p in model.parameters() if id(p) not in wrapped]
    for p in rest:
        p.requires_grad_(True)
    decay = [p for p in rest if decays(p)]
    no_decay = [p for p in rest if not decays(p)]
    return [{"params": ps, "weight_decay": wd, "lr": lr} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]


def _scheduler(cfg: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """DeepSpeed calls this with its basic optimizer and steps the schedule once per optimizer step."""
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    return lambda optimizer: get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup,
                                           num_training_steps=total_steps)
