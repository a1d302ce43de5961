"""wrap_model / merge_and_unwrap: put MoLFLinear layers into a transformers model and take them out."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .config import MoLFConfig
from .layers import MoLFLinear

logger = logging.getLogger("molf_ds")


@dataclass(frozen=True)
class WrapSummary:
    modules: tuple[str, ...]
    trainable: dict[str, int]  # parameters per expert kind: full, lora, other

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v:,}" for k, v in self.trainable.items())
        return f"MoLF wrapped {len(self.modules)} linear layers; trainable parameters: {counts}"


def decays(param: torch.Tensor) -> bool:
    """Whether weight decay applies to `param`: matrices (and higher) do, vectors (biases, norms) do not. The shape
    is the parameter's whole one, also under ZeRO-3 where the local tensor is a flat partition (`ds_shape`)."""
    return len(getattr(param, "ds_shape", param.shape)) >= 2


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def molf_modules(model: nn.Module) -> list[tuple[str, MoLFLinear]]:
    """Every MoLFLinear of `model` with its qualified name, in module order (the routing order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLFLinear)]


def wrap_model(model: nn.Module, cfg: MoLFConfig) -> nn.Module:
    """Replace the target linears of `model` by MoLFLinear in place and set what trains; returns `model`."""
    if molf_modules(model):
        raise ValueError("wrap_model: the model already has MoLF layers; pass it to build_optimizer as is")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]
    targets = [(n, m) for n, m in linears if _matches(n, cfg.target_modules) and not _matches(n, cfg.exclude_modules)]
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(
            f"MoLFConfig.target_modules={list(cfg.target_modules)} match no linear layer of "
            f"{type(model).__name__} (after exclude_modules); its linear layers are named {names}"
        )
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        wrapped = MoLFLinear(
            linear, cfg.lora_ranks, cfg.lora_alphas, cfg.use_rslora, cfg.lora_dropout, trains_base=cfg.trains_base
        )
        setattr(model.get_submodule(parent_name), child, wrapped)
    _set_trainable(model, cfg)
    summary = _summarize(model)
    model.molf_summary = summary
    logger.info("%s", summary)
    return model


def _set_trainable(model: nn.Module, cfg: MoLFConfig) -> None:
    expert_params = set()
    for _, module in molf_modules(model):
        module.base_layer.requires_grad_(cfg.trains_base)
        for params in module.expert_parameters().values():
            expert_params.update(map(id, params))
            for p in params:
                p.requires_grad_(True)
    if cfg.freeze_non_linear:
        for p in model.parameters():
            if id(p) not in expert_params:
                p.requires_grad_(False)


def _summarize(model: nn.Module) -> WrapSummary:
    modules = molf_modules(model)
    counts = {"full": 0, "lora": 0, "other": 0}
    seen: set[int] = set()
    for _, module in modules:
        for expert, params in module.expert_parameters().items():
            seen.update(map(id, params))
            counts["full" if expert == "full" else "lora"] += sum(full_numel(p) for p in params)
    counts["other"] = sum(full_numel(p) for p in model.parameters() if p.requires_grad and id(p) not in seen)
    return WrapSummary(tuple(n for n, _ in modules), counts)


def full_numel(p: torch.Tensor) -> int:
    """Element count, also for parameters partitioned by ZeRO-3 (whose local shape is empty)."""
    return getattr(p, "ds_numel", p.numel())


@torch.no_grad()
def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """Fold every expert into its base weight and put the plain nn.Linear back; returns `model`."""
    for name, module in molf_modules(model):
        parent_name, _, child = name.rpartition(".")
        merged = module.merged_linear()
        merged.requires_grad_(True)
        setattr(model.get_submodule(parent_name), child, merged)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "molf_summary"):
        del model.molf_summary
    return model

