"""The engines the benchmark compares, each built the way a user would build it.

- ``fft``: every parameter of the plain model trains with torch AdamW (``fused=True``, the fastest torch AdamW;
  ``--baseline-optimizer`` picks another) as DeepSpeed's client optimizer; with optimizer offload, DeepSpeed's
  own choice (``DeepSpeedCPUAdam``, from an ``optimizer`` block). Param groups as MoLF's: the target linears,
  other weights (decay), other vectors (no decay), so both issue the same per-group collectives.
- ``lora``: PEFT LoRA of rank sum(MoLF-E ranks) on the same target linears, optimizer as ``fft``.
- ``molf`` / ``molf-e``: ``molf_ds.initialize``, MoLFAdamW everywhere (with offload too).
- ``ds-adamw``: the MoLF-wrapped model (same trainable tensors, same groups as ``molf``) with DeepSpeed's own
  AdamW (``FusedAdam``, or ``DeepSpeedCPUAdam`` under offload): the optimizer-step baseline of
  benchmarks/optimizer_step.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from molf_ds.commands.methods import BENCH_EXTRA_METHODS, BENCH_METHODS, is_molf
from molf_ds.config import DEFAULT_TARGETS, MoLFConfig
from molf_ds.wrapping import decays

BASELINE_OPTIMIZERS = ("torch-fused", "torch", "deepspeed")


@dataclass
class Settings:
    """Everything a cell needs besides (stage, offload, method); one value for every cell of a run."""

    model: str = "qwen2-h256"
    gguf_file: str | None = None  # a GGUF checkpoint inside the `model` folder
    seq: int = 256
    micro_batch: int = 1
    warmup: int = 2
    steps: int = 8
    dtype: str = "fp32"  # fp32 | bf16
    device: str = "cpu"  # cpu | cuda
    molf_ranks: tuple[int, ...] = ()  # () = scaled from the paper's by hidden size (see default_ranks)
    molf_e_ranks: tuple[int, ...] = ()
    alpha: float = 32.0
    lora_dropout: float = 0.1
    lr: float = 5e-5
    lora_lr: float = 5e-5
    baseline_optimizer: str = "torch-fused"
    reference_repeats: int = 10  # steps of the plain AdamW references on the optimizer's flat tensors
    activation_checkpointing: bool = False
    speculative_update: bool = False  # MoLFConfig.speculative_update for molf / molf-e
    offload_param: bool = False  # ZeRO-3 offload cells also offload parameters (offload_param: cpu)
    seed: int = 0
    extra_ds: dict[str, Any] = field(default_factory=dict)  # merged into zero_optimization

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lora_rank(self) -> int:
        return sum(self.molf_e_ranks)


def default_ranks(hidden: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The paper's ranks (MoLF r=128, MoLF-E r=32 and 128) from hidden size 1024 on; smaller models scale them by
    hidden/2048 (hidden 256: r=16 and (4, 16)), so that LoRA stays as small against W as in the paper."""
    if hidden >= 1024:
        return (128,), (32, 128)
    scale = hidden / 2048
    return (max(1, round(128 * scale)),), (max(1, round(32 * scale)), max(1, round(128 * scale)))


def ds_config(s: Settings, stage: int, offload: bool) -> dict[str, Any]:
    # ZeRO-1/2 as in the presets: the gradient all-reduce in place, not through a flattened copy (README, presets)
    zero: dict[str, Any] = {"stage": stage, **({"reduce_scatter": False} if stage in (1, 2) else {}), **s.extra_ds}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": s.device == "cuda"}
        if stage == 3 and s.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": s.device == "cuda"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.micro_batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_optimization": zero,
    }
    if s.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def molf_config(s: Settings, method: str) -> MoLFConfig:
    variant = "molf-e" if method == "molf-e" else "molf"
    ranks = s.molf_e_ranks if variant == "molf-e" else s.molf_ranks
    return MoLFConfig(variant=variant, lora_ranks=ranks, lora_alphas=[s.alpha] * len(ranks),
                      lora_dropout=s.lora_dropout, lr=s.lr, lora_lr=s.lora_lr, speculative_update=s.speculative_update)


def _is_target(name: str) -> bool:
    return any(name.endswith(f".{t}.weight") or name.endswith(f".{t}.bias") for t in DEFAULT_TARGETS)


def fft_groups(model: nn.Module, s: Settings) -> list[dict[str, Any]]:
    """MoLF's grouping on the plain model: target linears, other weights, other vectors (empty groups dropped)."""
    groups: dict[str, list[nn.Parameter]] = {"targets": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["targets" if _is_target(name) else "decay" if decays(p) else "no_decay"].append(p)
    decay = {"targets": 0.1, "decay": 0.1, "no_decay": 0.0}
    return [{"params": ps, "weight_decay": decay[k]} for k, ps in groups.items() if ps]


def lora_groups(model: nn.Module) -> list[dict[str, Any]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": trainable, "weight_decay": 0.01}]


def _adamw_engine(model: nn.Module, groups: list[dict[str, Any]], s: Settings, stage: int, offload: bool,
                  own: bool) -> Any:
    """deepspeed.initialize with torch AdamW as client, or (own, or offload) DeepSpeed's own AdamW."""
    import deepspeed

    from molf_ds.zero.ds_config import check_deepspeed_version

    check_deepspeed_version()
    config = ds_config(s, stage, offload)
    if own or offload or s.baseline_optimizer == "deepspeed":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": s.lr, "betas": [0.9, 0.999], "eps": 1e-8}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    else:
        fused = {"fused": True} if s.baseline_optimizer == "torch-fused" else {}
        optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, **fused)
        config["zero_allow_untested_optimizer"] = True
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def build_engine(method: str, model: nn.Module, s: Settings, stage: int, offload: bool) -> Any:
    """The DeepSpeed engine of `method` over `model` (a plain transformers model, modified in place)."""
    if is_molf(method):
        import molf_ds

        engine, *_ = molf_ds.initialize(model, molf_config(s, method), ds_config(s, stage, offload))
        return engine
    if method == "ds-adamw":
        import molf_ds
        from molf_ds.optim import ExpertIndex, param_groups

        cfg = molf_config(s, "molf")
        molf_ds.wrap_model(model, cfg)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in param_groups(model, ExpertIndex(model), cfg)]
        return _adamw_engine(model, groups, s, stage, offload, own=True)
    if method == "fft":
        return _adamw_engine(model, fft_groups(model, s), s, stage, offload, own=False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=s.lora_rank, lora_alpha=s.alpha, use_rslora=True, lora_dropout=s.lora_dropout,
                          target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        return _adamw_engine(model, lora_groups(model), s, stage, offload, own=False)
    raise ValueError(f"bench: unknown method {method!r}: use {BENCH_METHODS + BENCH_EXTRA_METHODS}")


def optimizer_name(engine: Any) -> str:
    optimizer = engine.basic_optimizer
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused"):
        name += "(fused)"
    return name


def trainable_params(engine: Any) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)

