"""HF users. `MoLFTrainer` is a `transformers.Trainer` whose optimizer is MoLF; `accelerate_prepare` is
`accelerator.prepare` for a MoLF model and optimizer.

    args = TrainingArguments("out", deepspeed="ds_configs/zero2.json", ...)   # "auto" values are fine
    trainer = MoLFTrainer(model, args, molf_config=MoLFConfig(...), routing_log="out/routing.jsonl",
                          train_dataset=..., data_collator=...)
    trainer.train()

The model is wrapped here when it is not already. Without `molf_config`, MoLF uses the Trainer's learning
rate for both the full and the LoRA experts and its other defaults. Logs gain the share of modules each
expert won at the last step (`routing/<expert>`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import MoLFConfig
from .optim import MoLFAdamW
from .zero import attach, prepare
from .zero.ds_config import prepare_ds_config


class _AttachToDeepSpeed(TrainerCallback):
    """Once accelerate has built the DeepSpeed engine, point MoLF at the tensors it steps."""

    def __init__(self, trainer: "MoLFTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled and trainer.molf_optimizer.router is None:
            attach(trainer.deepspeed.optimizer, trainer.molf_optimizer)


class MoLFTrainer(Trainer):
    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        molf_config: MoLFConfig | None = None,
        routing_log: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        self.molf_config = molf_config or MoLFConfig(lr=args.learning_rate, lora_lr=args.learning_rate)
        hf_ds = getattr(args, "hf_deepspeed_config", None)
        if hf_ds is not None:
            hf_ds.config.update(prepare_ds_config(hf_ds.config, allow_auto=True))
        self.molf_optimizer: MoLFAdamW = prepare(model, self.molf_config, routing_log,
                                                 hf_ds.config if hf_ds is not None else None)
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(_AttachToDeepSpeed(self))

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None:
            self.optimizer = self.molf_optimizer
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.molf_optimizer.last_winners is not None:
            logs.update({f"routing/{e}": s for e, s in self.molf_optimizer.routing_shares().items()})
        super().log(logs, *args, **kwargs)


def accelerate_prepare(
    accelerator: Any, model: nn.Module, molf_config: MoLFConfig, *objects: Any, routing_log: str | Path | None = None
) -> tuple:
    """Wrap `model`, build its MoLF optimizer and `accelerator.prepare(model, optimizer, *objects)`; under the
    DeepSpeed plugin, MoLF is then attached to the engine. Returns what `prepare` returns. On CPU, create the
    Accelerator with `kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]`."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config if plugin is not None else None
    if ds is not None:
        ds.update(prepare_ds_config(ds, allow_auto=True))
    optimizer = prepare(model, molf_config, routing_log, ds)
    prepared = accelerator.prepare(model, optimizer, *objects)
    if ds is not None:
        attach(prepared[0].optimizer, optimizer)
    return prepared
