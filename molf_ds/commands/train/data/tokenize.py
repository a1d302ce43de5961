"""Tokenisation with the loss on completion tokens only, and the padding collator."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Example

IGNORE_INDEX = -100  # label of tokens without loss: the prompt and the padding


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: completions end with one")
    return tokenizer.eos_token_id


def encode(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], eos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with the tokenizer's special tokens, completion ids [+ EOS]) per pair, tokenised
    separately so that the prompt/completion boundary is exact."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    end = [eos_id(tokenizer)] if eos else []
    return [(p, c + end) for p, c in zip(prompt_ids, completion_ids)]


def tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Features {input_ids, labels} (labels = IGNORE_INDEX on the prompt), cut to `max_length`; returns them
    and the number of examples dropped because no completion token fit."""
    pairs = encode(tokenizer, [e.prompt for e in examples], [e.completion for e in examples])
    features, dropped = [], 0
    for prompt, completion in pairs:
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        features.append({"input_ids": ids, "labels": labels})
    return features, dropped


class Collator:
    """Right-pads a list of features into input_ids / attention_mask / labels tensors."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
