"""What a run leaves behind: the merged vanilla transformers model, and MoLF-E experts as a PEFT adapter."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .optim.routing_log import is_rank_zero
from .wrapping import molf_modules

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _module_of(engine_or_model: Any) -> nn.Module:
    return getattr(engine_or_model, "module", engine_or_model)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gathered(params: list[nn.Parameter]):
    """Full parameters inside the block under ZeRO-3 (a no-op for ordinary parameters)."""
    import deepspeed  # deferred: slow to import

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def merged_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The state dict (on CPU) of the merged vanilla model, leaving `model` untouched. Under ZeRO-3 the
    parameters are gathered one layer at a time; every rank must call it, and with `rank0_only` only
    rank 0 keeps the tensors."""
    keep = not rank0_only or is_rank_zero()
    state: dict[str, torch.Tensor] = {}
    layers = molf_modules(model)
    for name, layer in layers:
        with gathered(list(layer.parameters())):
            if keep:
                state[f"{name}.weight"] = layer.merged_weight().cpu()
                if layer.base_layer.bias is not None:
                    state[f"{name}.bias"] = layer.base_layer.bias.detach().cpu().clone()
    inside_layers = tuple(f"{name}." for name, _ in layers)
    for key, p in model.named_parameters(remove_duplicate=False):
        if not key.startswith(inside_layers):
            with gathered([p]):
                if keep:
                    state[key] = p.detach().cpu().clone()
    if keep:
        buffers = dict(model.named_buffers())
        for key in model.state_dict():
            if key in buffers and not key.startswith(inside_layers):
                state[key] = buffers[key].detach().cpu().clone()
    return state


def save_merged(engine_or_model: Any, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Rank 0 writes the merged model as a vanilla transformers checkpoint (and the tokenizer, when given)."""
    out_dir = Path(out_dir)
    model = _module_of(engine_or_model)
    state = merged_state_dict(model, rank0_only=True)
    if getattr(model.config, "tie_word_embeddings", False):  # ZeRO's flat buffers hide the tie from save_pretrained
        for key in getattr(model, "_tied_weights_keys", None) or ():
            state.pop(key, None)
    if is_rank_zero():
        model.save_pretrained(out_dir, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    _barrier()
    return out_dir


@torch.no_grad()
def peft_adapter(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, adapter weights) equal to the LoRA experts of a MoLF-E model: one adapter of rank
    sum(r_i) whose A stacks the A_i and whose B concatenates the s_i B_i (PEFT scaling 1)."""
    try:
        from peft import LoraConfig
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError('export_peft needs peft: pip install peft (or "molf-ds[cli]")',
                                  name=error.name) from None

    layers = molf_modules(model)
    if not layers:
        raise ValueError("export_peft: the model has no MoLF layers")
    if "full" in layers[0][1].expert_names:
        raise ValueError(
            "export_peft: this MoLF model trains its base weights, which a LoRA adapter cannot carry; "
            "use molf_ds.save_merged for it (export_peft is for molf-e)"
        )
    weights = {}
    for name, layer in layers:
        with gathered([lin.weight for lin in (*layer.lora_A, *layer.lora_B)]):
            a = torch.cat([a.weight for a in layer.lora_A], dim=0)
            b = torch.cat([s * b.weight for b, s in zip(layer.lora_B, layer.scaling)], dim=1)
            weights[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
            weights[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    rank = sum(a.out_features for a in layers[0][1].lora_A)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the experts' own scalings are folded into B
        lora_dropout=0.0,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
    )
    return config, weights


def export_peft(engine_or_model: Any, out_dir: str | Path) -> Path:
    """Rank 0 writes MoLF-E's experts as a standard PEFT LoRA adapter (adapter_config.json + safetensors)."""
    from safetensors.torch import save_file  # deferred: only the export needs it

    out_dir = Path(out_dir)
    config, weights = peft_adapter(_module_of(engine_or_model))
    if is_rank_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out_dir)
        save_file(weights, out_dir / ADAPTER_WEIGHTS)
    _barrier()
    return out_dir
