"""Tiny transformers models built from configs (random init, no hub), saved and reloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=128,
)
CONFIGS = {
    "qwen2": lambda **kw: Qwen2Config(**{**_COMMON, **kw}),
    "llama": lambda **kw: LlamaConfig(**{**_COMMON, **kw}),
    "gemma3": lambda **kw: Gemma3TextConfig(**{**_COMMON, **kw}),
}


def tiny_model(arch: str, directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random-init `arch`, save it to `directory`, and load it back with `from_pretrained`."""
    torch.manual_seed(seed)
    config = CONFIGS[arch](**overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")


def token_batches(n_steps: int, batch: int, seq: int, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random token batches, one per step."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n_steps)]
