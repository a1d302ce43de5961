"""Task metrics on the evaluation items, sharded over the data-parallel ranks and summed.

- likelihood choices (med 4-way accuracy, fact efficacy / paraphrase / neighborhood): the option with the
  highest mean log-likelihood per token wins; option scoring is batched;
- generations (sql, jsonl exact match): greedy decoding, batched with left padding; sql compares the
  queries after normalisation (`normalise_sql`: sqlglot's canonical form where both parse, then case,
  whitespace and quotes), other tasks after whitespace normalisation;
- teacher-forced likelihoods (chat and alpaca): `token_accuracy`, the share of the loss tokens (assistant
  turns, outputs) that are the model's argmax prediction, and `loss`, their mean cross-entropy (perplexity is
  exp(loss)); both per token over all items, not per item.

Every rank runs the same number of forward passes and `generate` calls (the per-rank lists are padded
with dummy work whose results are dropped, and `generate` runs with `synced_gpus` under ZeRO-3), so that
ZeRO-3's parameter gathering cannot hang. Results are deterministic: they depend only on the items, the
batch size and the model.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .data import IGNORE_INDEX, Choice, Collator, Generation, Likelihood, encode, pad_id
from .data.tokenize import sequences


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[Choice | Generation | Likelihood], metrics: Sequence[str],
    batch_size: int, max_new_tokens: int, device: torch.device | str, progress: bool = True,
) -> dict[str, float]:
    """{metric: share of items correct (Likelihood items: of tokens; `loss`: mean per token)} over all ranks;
    each rank scores items[rank::world]."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = list(items[rank::world])
    counts = torch.zeros(2, len(metrics), dtype=torch.float64)  # correct, total
    was_training = model.training
    model.eval()
    choices = [item for item in mine if isinstance(item, Choice)]
    generations = [item for item in mine if isinstance(item, Generation)]
    pairs = [(c.prompt, o) for c in choices for o in c.options]
    prompts = [g.prompt for g in generations]
    likelihoods = [item for item in mine if isinstance(item, Likelihood)]
    # the same number of batches on every rank, whatever each rank's share of items
    n_score, n_generate, n_teacher = _same_everywhere([math.ceil(len(pairs) / batch_size),
                                                       math.ceil(len(prompts) / batch_size),
                                                       math.ceil(len(likelihoods) / batch_size)], device, distributed)
    bar = _bar(n_score + n_generate + n_teacher, rank == 0 and progress)
    dummy_choice = next((i for i in items if isinstance(i, Choice)), None)
    dummy_prompt = next((i.prompt for i in items if isinstance(i, Generation)), None)
    if n_score:
        padded = pairs + [(dummy_choice.prompt, dummy_choice.options[0])] * (n_score * batch_size - len(pairs))
        scores = iter(mean_logliks(model, tokenizer, padded, batch_size, device, bar=bar)[:len(pairs)])
        for choice in choices:
            s = [next(scores) for _ in choice.options]
            others = [v for i, v in enumerate(s) if i != choice.answer]
            counts[:, metrics.index(choice.metric)] += torch.tensor([float(s[choice.answer] > max(others)), 1.0])
    if n_generate:
        padded = prompts + [dummy_prompt] * (n_generate * batch_size - len(prompts))
        texts = greedy_batch(model, tokenizer, padded, max_new_tokens, device, batch_size,
                             synced=distributed and world > 1 and is_zero3(model), bar=bar)[:len(prompts)]
        for item, text in zip(generations, texts):
            counts[:, metrics.index(item.metric)] += torch.tensor([float(matches(item, text)), 1.0])
    if n_teacher:
        dummy = next(i for i in items if isinstance(i, Likelihood))
        padded = likelihoods + [dummy] * (n_teacher * batch_size - len(likelihoods))
        for loss, correct, tokens in token_scores(model, tokenizer, padded, batch_size, device, bar)[:len(likelihoods)]:
            for metric, value in (("token_accuracy", correct), ("loss", loss)):
                if metric in metrics:
                    counts[:, metrics.index(metric)] += torch.tensor([value, tokens])
    bar.close()
    model.train(was_training)
    if distributed:
        on_device = counts.to(device)
        dist.all_reduce(on_device)
        counts = on_device.cpu()
    return {m: counts[0, i].item() / counts[1, i].item() for i, m in enumerate(metrics) if counts[1, i] > 0}


def mean_logliks(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
    device: torch.device | str, bar: Any = None,
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
        if bar is not None:
            bar.update(1)
    return out


def token_scores(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[Likelihood], batch_size: int, device: torch.device | str,
    bar: Any = None,
) -> list[tuple[float, float, float]]:
    """(summed cross-entropy, tokens predicted exactly, tokens) over each item's loss tokens, teacher-forced."""
    collate = Collator(pad_id(tokenizer))
    features = []
    for item in items:
        ids, labels = sequences([item.example], tokenizer)[0]
        features.append({"input_ids": ids[:item.max_length], "labels": labels[:item.max_length]})
    out: list[tuple[float, float, float]] = []
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                reduction="none")
        correct = (logits.argmax(-1) == labels) & mask
        out += zip(nll.sum(-1).tolist(), correct.sum(-1).tolist(), mask.sum(-1).tolist())
        if bar is not None:
            bar.update(1)
    return [(float(a), float(b), float(c)) for a, b, c in out]


def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, device: torch.device | str) -> str:
    """The greedy continuation of one prompt (no padding)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def greedy_batch(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, device: torch.device | str,
    batch_size: int, synced: bool = False, bar: Any = None,
) -> list[str]:
    """Greedy continuations, `batch_size` prompts per `generate` call, left-padded (in the given order, so
    that every rank makes the same number of calls)."""
    pad = pad_id(tokenizer)
    encoded = tokenizer(list(prompts))["input_ids"]
    out: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        out += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        if bar is not None:
            bar.update(1)
    return out


# ---- answer comparison ------------------------------------------------------------------------------
def matches(item: Generation, text: str) -> bool:
    """Whether a generated answer counts as the item's target."""
    if getattr(item, "normalise", "whitespace") == "sql":
        return sql_match(text, item.target)
    return _normalise(text) == _normalise(item.target)


def sql_match(predicted: str, target: str) -> bool:
    """Exact match of two SQL queries up to whitespace, case, quote style, a trailing ';', and (where both
    parse with sqlglot) formatting choices sqlglot canonicalises (e.g. `t a` vs `t AS a`)."""
    return normalise_sql(predicted) == normalise_sql(target)


def normalise_sql(query: str) -> str:
    text = query.strip().rstrip(";").strip()
    try:
        import sqlglot
        from sqlglot.errors import SqlglotError

        try:
            parsed = sqlglot.parse(text, error_level=sqlglot.ErrorLevel.RAISE)
            if len(parsed) == 1 and parsed[0] is not None:
                text = parsed[0].sql()
        except (SqlglotError, RecursionError, ValueError):
            pass  # not parseable: the textual normalisation only
    except ImportError:  # sqlglot is a dependency; without it the textual normalisation still applies
        pass
    text = text.lower().replace('"', "'").replace("`", "'")
    text = " ".join(text.split())
    text = re.sub(r"\s*([(),;=<>!+\-*/])\s*", r"\1", text)
    return text.rstrip(";")


def _normalise(text: str) -> str:
    return " ".join(text.split())


# ---- helpers ----------------------------------------------------------------------------------------
def is_zero3(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitioned (every forward gathers them collectively)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _same_everywhere(values: list[int], device: torch.device | str, distributed: bool) -> list[int]:
    """Element-wise max over the ranks."""
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm  # deferred: only the progress bar needs it

    return tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
