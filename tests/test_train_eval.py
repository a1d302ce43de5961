"""Evaluation metrics (likelihood choices, greedy exact match) and the data order of the training loop."""
from __future__ import annotations

import pytest
import torch

from molf_ds.commands.train.data import Choice, DataError, Generation
from molf_ds.commands.datagen.demo import build_model, build_tokenizer, counterfact_records
from molf_ds.commands.train.evaluate import evaluate, greedy, mean_logliks
from molf_ds.commands.train.loop import Order


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(counterfact_records(8))
    return build_model(tokenizer, seed=5).eval(), tokenizer


def test_mean_loglik_is_the_completion_tokens_mean(tiny):
    model, tokenizer = tiny
    prompt, completion = "The profession of Kalo Renmi is", " pilot poet"
    (got, other) = mean_logliks(model, tokenizer, [(prompt, completion), ("Kalo", " Renmi")], 2, "cpu")
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
    want = sum(logprobs[len(p) - 1 + i, token].item() for i, token in enumerate(c)) / len(c)
    assert got == pytest.approx(want, abs=1e-5) and other != got


def test_evaluate_counts_choices_and_exact_matches(tiny):
    model, tokenizer = tiny
    prompts = ["The profession of Kalo Renmi is", "Kalo Renmi works as a"]
    options = (" pilot", " poet")
    scores = mean_logliks(model, tokenizer, [(p, o) for p in prompts for o in options], 4, "cpu")
    best = [0 if scores[0] > scores[1] else 1, 0 if scores[2] > scores[3] else 1]
    continuation = greedy(model, tokenizer, prompts[0], 3, "cpu")
    items = [Choice("efficacy", prompts[0], options, best[0]), Choice("efficacy", prompts[1], options, 1 - best[1]),
             Generation("exact_match", prompts[0], f"  {continuation} "),
             Generation("exact_match", prompts[0], continuation + " extra")]
    result = evaluate(model, tokenizer, items, ("efficacy", "exact_match", "unused"), 4, 3, "cpu")
    assert result == {"efficacy": 0.5, "exact_match": 0.5}
    assert not model.training


def test_order_partitions_each_global_batch_and_reshuffles_per_epoch():
    n, micro, world, accumulation = 50, 3, 2, 2
    order = Order(n, micro, world, accumulation, seed=7)
    assert order.steps_per_epoch == 50 // 6 // 2 == 4 and order.micro_per_epoch == 8
    epoch0 = [i for k in range(8) for rank in range(world) for i in order.indices(k, rank)]
    assert len(epoch0) == len(set(epoch0)) == 48  # no example twice in an epoch; the remainder is dropped
    epoch1 = [i for k in range(8, 16) for rank in range(world) for i in order.indices(k, rank)]
    assert epoch1 != epoch0 and len(set(epoch1)) == 48
    assert Order(n, micro, world, accumulation, seed=7).indices(9, 1) == order.indices(9, 1)  # resumable
    with pytest.raises(DataError, match="fewer than one global batch"):
        Order(5, micro, world, accumulation, seed=0)
