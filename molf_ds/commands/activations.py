"""Activation memory of a training step, counted on the real architecture without weights (`molf-ds estimate-memory`).

The model is built on the meta device with one and with two decoder layers and run forward on meta tokens of the
asked shape, each method as it trains (FFT: every weight; LoRA and MoLF-E: W frozen; MoLF: W and its experts),
while a saved-tensors hook adds up the bytes autograd keeps for backward (parameters left out, each storage once).
Two layers minus one gives a layer's bytes, one minus that the rest (embeddings, final norm, logits and loss).
Attention is counted as a fused kernel (flash or memory-efficient SDPA, as on GPUs and in torch's CPU SDPA) keeps
it: query, key and value, output and log-sum-exp, no attention matrix (on meta, SDPA would take its math path).
On top comes one transient: the gradient of the largest saved tensor (the fp32 logits, in backward).
The LoRA baseline is counted as one MoLF expert of its rank on frozen W (the same tensors).
With activation checkpointing each layer keeps its input only, and one layer is recomputed at a time."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from molf_ds.config import MoLFConfig
from molf_ds.wrapping import molf_modules, wrap_model


@dataclass(frozen=True)
class Activations:
    per_layer: int  # bytes a decoder layer saves for backward
    rest: int  # embeddings, final norm, logits, loss; plus the largest saved tensor's gradient
    layer_input: int  # bytes of one layer's input (what checkpointing keeps per layer)
    layers: int

    def total(self, checkpointing: bool = False) -> int:
        if checkpointing:
            return self.rest + self.layers * self.layer_input + self.per_layer
        return self.rest + self.layers * self.per_layer


FUSED = "molf_ds_meta_fused"


class _FusedAttention(torch.autograd.Function):
    """The tensors a fused attention kernel saves for backward, on meta: q, k, v (k and v not repeated for grouped
    queries), its output and the fp32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never run: the count needs forward only
        raise NotImplementedError


def _fused_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(FUSED, _fused_attention)


def _saved(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """Bytes of the tensors autograd saves in one forward (each storage once, parameters left out), and the
    largest of them."""
    params = {id(p) for p in model.parameters()}
    sizes: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # alive until counted, so that no id is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            sizes[id(base)] = base.numel() * base.element_size()
            keep.append(base)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(sizes.values()), max(sizes.values(), default=0)


def _with_layers(config, layers: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def activations(config, method: str, ranks: tuple[int, ...], seq: int, micro_batch: int, lora_dropout: float,
                dtype: torch.dtype = torch.bfloat16) -> Activations:
    """Activation bytes of one micro-batch of `micro_batch` x `seq` tokens for `method` (fft, lora, molf, molf-e)."""
    saved, largest = [], 0
    for layers in (1, 2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_with_layers(config, layers), dtype=dtype,
                                                     attn_implementation=FUSED)
            if method != "fft":
                variant = "molf-e" if method == "molf-e" else "molf"
                expert_ranks = (sum(ranks),) if method == "lora" else ranks
                wrap_model(model, MoLFConfig(variant=variant, lora_ranks=expert_ranks,
                                             lora_alphas=[32.0] * len(expert_ranks), lora_dropout=lora_dropout))
                if method == "lora":  # one expert of LoRA's rank on frozen W
                    for _, module in molf_modules(model):
                        module.base_layer.requires_grad_(False)
        ids = torch.zeros((micro_batch, seq), dtype=torch.long, device="meta")
        total, biggest = _saved(model.train(), ids)
        saved.append(total)
        largest = max(largest, biggest)
    per_layer = saved[1] - saved[0]
    layer_input = micro_batch * seq * config.hidden_size * torch.finfo(dtype).bits // 8
    return Activations(per_layer, saved[0] - per_layer + largest, layer_input, config.num_hidden_layers)
