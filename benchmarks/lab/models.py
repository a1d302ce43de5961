"""Models the benchmark trains: pretrained ones (a `molf-ds models` name such as smollm2-135m, a model folder with
weights, a GGUF checkpoint), or random-init ones built from a config (no download): the bundled tiny Qwen2 configs
for CPU runs, or any architecture `molf-ds estimate-memory` knows (qwen2.5-1.5b, qwen2.5-3b, gemma-3-1b)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from molf_ds.commands.models import MODELS, resolve

CONFIGS = Path(__file__).parent / "configs"


def bundled() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_config(name: str, gguf_file: str | None = None):
    """A bench config (qwen2-h64, qwen2-h256, qwen2-h512), else what `molf_ds.commands.memory.load_config` accepts."""
    path = CONFIGS / f"{name}.json"
    if path.is_file():
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    from molf_ds.commands.memory import load_config as load_architecture

    return load_architecture(name, "--model", also=bundled(), gguf_file=gguf_file)


def hidden_size(name: str, gguf_file: str | None = None) -> int:
    return int(load_config(name, gguf_file).hidden_size)


def pretrained(name: str, gguf_file: str | None = None) -> bool:
    """Whether `name` brings weights: a `molf-ds models` name, a GGUF checkpoint, or a folder with safetensors."""
    return name in MODELS or bool(gguf_file) or any(Path(name).glob("*.safetensors"))


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, gguf_file: str | None = None
          ) -> torch.nn.Module:
    """A pretrained model's own weights (see `pretrained`), else the architecture with random weights drawn from
    `seed` (every rank draws the same model)."""
    torch.manual_seed(seed)
    if pretrained(name, gguf_file):
        return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype, attn_implementation="sdpa",
                                                    **({"gguf_file": gguf_file} if gguf_file else {}))
    return AutoModelForCausalLM.from_config(load_config(name), dtype=dtype, attn_implementation="sdpa")


def token_batch(step: int, rank: int, micro_batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Random tokens, deterministic per (step, rank), the same for every method."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    return torch.randint(0, vocab, (micro_batch, seq), generator=g)
