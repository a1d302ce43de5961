"""Tokenisation with the loss on completion tokens only (a conversation: on its assistant turns), and the padding
collator."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Conversation, DataError, Example

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


def check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.task chat: tokenizer {tokenizer.name_or_path!r} has no chat template: set "
                        "model.tokenizer to one that has (e.g. the instruct model's tokenizer), or write the rows as a "
                        "jsonl or alpaca task")


def encode_conversation(tokenizer: Any, conversation: Conversation) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the conversation rendered with the chat template, tokenised as a whole without
    added special tokens (as apply_chat_template(tokenize=True)); labels are the ids of the tokens of the assistant
    turns, IGNORE_INDEX elsewhere. Assistant turn i spans the text between the rendering of
    turns [0, i) with the generation prompt and the rendering of turns [0, i]: its content and the template's
    end-of-turn marker (e.g. `<|im_end|>`); a token is trained when any of its characters is in such a span."""
    check_chat_template(tokenizer)
    messages = [{"role": role, "content": content} for role, content in conversation.messages]

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as error:  # jinja's TemplateError, or a template's own raise_exception
            raise DataError(f"{conversation.where}: the chat template of tokenizer {tokenizer.name_or_path!r} cannot "
                            f"render field 'messages': {error}".replace("\n", " ")) from None

    text = render(messages, False)
    spans = []
    for i, (role, _) in enumerate(conversation.messages):
        if role != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[:i + 1], False)
        if not (end.startswith(start) and text.startswith(end)):
            raise DataError(f"{conversation.where}: the chat template of tokenizer {tokenizer.name_or_path!r} renders "
                            f"the turns before assistant turn messages[{i}] differently in the whole conversation, so "
                            "that turn's tokens cannot be located (a template that rewrites earlier turns)")
        spans.append((len(start), len(end)))
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        inside = [any(begin < b and end > a for a, b in spans) for begin, end in encoded["offset_mapping"]]
    else:  # no offsets: the text cut at the turns' edges, each piece tokenised alone
        edges = sorted({0, len(text), *(x for span in spans for x in span)})
        ids, inside = [], []
        for a, b in zip(edges, edges[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            inside += [any(s <= a < e for s, e in spans)] * len(piece)
    return ids, [token if trained else IGNORE_INDEX for token, trained in zip(ids, inside)]


def sequences(examples: Sequence[Example | Conversation], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, uncut."""
    pairs = [e for e in examples if isinstance(e, Example)]
    encoded = iter(encode(tokenizer, [e.prompt for e in pairs], [e.completion for e in pairs]) if pairs else [])
    out = []
    for item in examples:
        if isinstance(item, Conversation):
            out.append(encode_conversation(tokenizer, item))
        else:
            prompt, completion = next(encoded)
            out.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return out


def tokenize(examples: Sequence[Example | Conversation], tokenizer: Any,
             max_length: int | None) -> tuple[list[dict[str, list[int]]], int]:
    """Features {input_ids, labels} (labels = IGNORE_INDEX on the prompt: a conversation's everything but its
    assistant turns), cut to `max_length`; returns them and the number of examples dropped because no
    completion token fit."""
    features, dropped = [], 0
    for ids, labels in sequences(examples, tokenizer):
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        features.append({"input_ids": ids, "labels": labels})
    return features, dropped


def pack(features: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Consecutive features concatenated into packs of at most `max_length` tokens (next fit, in order), each with
    position_ids restarting at 0 for every row: the model's causal mask then keeps attention within each row
    (transformers reads the restarts from position_ids when no attention_mask is given). A row's first label is
    IGNORE_INDEX, as it is unpacked (no token predicts it), so the loss sees the same tokens."""
    packs: list[dict[str, list[int]]] = []
    for f in features:
        n = len(f["input_ids"])
        if not packs or len(packs[-1]["input_ids"]) + n > max_length:
            packs.append({"input_ids": [], "labels": [], "position_ids": []})
        last = packs[-1]
        last["input_ids"] += f["input_ids"]
        last["labels"] += [IGNORE_INDEX, *f["labels"][1:]]
        last["position_ids"] += list(range(n))
    return packs


class Collator:
    """Right-pads a list of features into input_ids / attention_mask / labels tensors; packed features (with
    position_ids) into input_ids / position_ids / labels, the padding a row of its own, positions from 0 (called
    with use_cache=False: transformers reads packed rows from position_ids only without a cache)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in features[0]
        mask = torch.zeros((len(features), width), dtype=torch.long)
        positions = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(f["position_ids"])
                positions[i, n:] = torch.arange(width - n)
        if packed:
            return {"input_ids": ids, "position_ids": positions, "labels": labels}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
