"""Task metrics on the evaluation items, sharded over the data-parallel ranks and summed."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .data import IGNORE_INDEX, Choice, Collator, Generation, encode, pad_id


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[Choice | Generation], metrics: Sequence[str],
    batch_size: int, max_new_tokens: int, device: torch.device | str,
) -> dict[str, float]:
    """{metric: share of items correct} over all ranks; each rank scores items[rank::world]."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = list(items[rank::world])
    counts = torch.zeros(2, len(metrics), dtype=torch.float64)  # correct, total
    was_training = model.training
    model.eval()
    choices = [item for item in mine if isinstance(item, Choice)]
    scores = iter(mean_logliks(model, tokenizer, [(c.prompt, o) for c in choices for o in c.options],
                               batch_size, device))
    for choice in choices:
        s = [next(scores) for _ in choice.options]
        others = [v for i, v in enumerate(s) if i != choice.answer]
        counts[:, metrics.index(choice.metric)] += torch.tensor([float(s[choice.answer] > max(others)), 1.0])
    for item in mine:
        if isinstance(item, Generation):
            hit = _normalise(greedy(model, tokenizer, item.prompt, max_new_tokens, device)) == _normalise(item.target)
            counts[:, metrics.index(item.metric)] += torch.tensor([float(hit), 1.0])
    model.train(was_training)
    if distributed:
        on_device = counts.to(device)
        dist.all_reduce(on_device)
        counts = on_device.cpu()
    return {m: counts[0, i].item() / counts[1, i].item() for i, m in enumerate(metrics) if counts[1, i] > 0}


def mean_logliks(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
    device: torch.device | str,
) -> list[float]:
    """Mean log-likelihood per token of each completion given its prompt."""
    collate = Collator(pad_id(tokenizer))
    encoded = encode(tokenizer, [p for p, _ in pairs], [c for _, c in pairs], eos=False)
    features = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in encoded]
    out: list[float] = []
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += ((logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    return out


def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, device: torch.device | str) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def _normalise(text: str) -> str:
    return " ".join(text.split())
