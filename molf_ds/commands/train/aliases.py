"""Config keys of other trainers (HF Trainer / TRL, LLaMA-Factory, axolotl) and ours: an unknown key found here
is answered with the key `molf-ds train` uses instead, wherever it appears (top level, inside a section, in a
key=value override)."""
from __future__ import annotations

# their key -> our key(s): further ones are the MoLF-side or other method's key
ALIASES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("train.lr", "train.lora_lr"),
    "num_train_epochs": ("train.epochs",), "num_epochs": ("train.epochs",),
    "per_device_train_batch_size": ("train.micro_batch_size",), "micro_batch_size": ("train.micro_batch_size",),
    "batch_size": ("train.micro_batch_size",),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps",),
    "model_name_or_path": ("model.name_or_path",), "base_model": ("model.name_or_path",),
    "tokenizer_name": ("model.tokenizer",), "tokenizer_name_or_path": ("model.tokenizer",),
    "torch_dtype": ("model.dtype",), "bf16": ("model.dtype",), "fp16": ("model.dtype",),
    "lora_r": ("lora.r", "molf.lora_ranks"), "lora_rank": ("lora.r", "molf.lora_ranks"),
    "lora_alpha": ("lora.alpha", "molf.lora_alphas"), "lora_dropout": ("lora.dropout", "molf.lora_dropout"),
    "lora_target_modules": ("lora.target_modules", "molf.target_modules"), "lora_target": ("lora.target_modules",
                                                                                          "molf.target_modules"),
    "target_modules": ("lora.target_modules", "molf.target_modules"),
    "finetuning_type": ("method",), "adapter": ("method",),
    "output_dir": ("train.output_dir",), "max_steps": ("train.max_steps",),
    "warmup_steps": ("train.warmup_steps",), "warmup_ratio": ("train.warmup_ratio",),
    "lr_scheduler_type": ("train.scheduler",), "lr_scheduler": ("train.scheduler",),
    "weight_decay": ("train.weight_decay", "train.lora_weight_decay"), "seed": ("train.seed",),
    "adam_beta1": ("train.betas",), "adam_beta2": ("train.betas",), "adam_epsilon": ("train.eps",),
    "max_grad_norm": ("deepspeed.gradient_clipping",),
    "save_steps": ("train.save_steps",), "save_total_limit": ("train.save_total_limit",),
    "resume_from_checkpoint": ("train.resume",), "auto_resume_from_checkpoints": ("train.resume",),
    "logging_steps": ("train.logging_steps",), "report_to": ("train.report_to",),
    "eval_steps": ("eval.steps",), "load_best_model_at_end": ("train.load_best_model_at_end",),
    "metric_for_best_model": ("eval.metric",), "per_device_eval_batch_size": ("eval.batch_size",),
    "eval_batch_size": ("eval.batch_size",), "val_set_size": ("eval.holdout",),
    "eval_dataset": ("eval.data",), "test_datasets": ("eval.data",),
    "cutoff_len": ("data.max_length",), "sequence_len": ("data.max_length",), "max_seq_length": ("data.max_length",),
    "max_length": ("data.max_length",), "dataset": ("data.train",), "datasets": ("data.train",),
    "packing": ("data.packing",), "sample_packing": ("data.packing",),
    "deepspeed": ("deepspeed",), "gradient_checkpointing": ("model.gradient_checkpointing",),
    "attn_implementation": ("model.attn_implementation",), "flash_attention": ("model.attn_implementation",),
}


def alias_hint(key: str, section: str = "") -> str | None:
    """' (did you mean 'train.lr'? ...)' for another trainer's key (our key in `section` first, when it has
    one); None for any other key."""
    targets = ALIASES.get(str(key).lower())
    if targets is None:
        return None
    targets = sorted(targets, key=lambda target: not (section and target.startswith(section)))
    also = "".join(f" or '{t}'" for t in targets[1:])
    ours = targets[0].rpartition(".")[2] == key  # our name, in another section
    return f" (did you mean '{targets[0]}'{also}?{'' if ours else f' {key!r} is what other trainers call it'})"
