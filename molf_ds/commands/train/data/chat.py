"""`chat`: conversations rendered with the tokenizer's chat template, the loss on every assistant turn.

A row holds `messages: [{role, content}, ...]` (OpenAI / TRL; roles system, user, assistant) or ShareGPT's
`conversations: [{from, value}, ...]` (from: system, human, gpt). Evaluation is teacher-forced on the
evaluation rows' assistant tokens: `token_accuracy` (share predicted exactly, greedy) and `loss` (mean
cross-entropy per assistant token; perplexity = exp(loss)).
"""
from __future__ import annotations

from .base import Conversation, Likelihood, Row, Task

ROLES = ("system", "user", "assistant")
SHAREGPT = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


def conversation(row: Row) -> Conversation:
    if row.record.get("messages") is None and row.record.get("conversations") is None:
        raise row.fail("messages", "is missing (or give ShareGPT's 'conversations')")
    if row.record.get("messages") is not None:
        field, role_key, content_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    else:
        field, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT
    turns = []
    for turn in row.records(field):
        name = turn.text(role_key)
        if name not in roles:
            raise turn.fail(role_key, f"must be one of {', '.join(roles)}, got {name!r}")
        role = roles[name]
        turns.append((role, turn.text(content_key, empty_ok=role == "system")))
    if not any(role == "assistant" for role, _ in turns):
        raise row.fail(field, "has no assistant turn: nothing to train on")
    return Conversation(tuple(turns), f"{row.where}: row {row.number}")


def example(row: Row) -> Conversation:
    return conversation(row)


def evals(row: Row) -> list[Likelihood]:
    return [Likelihood(conversation(row))]


TASK = Task("chat", ("token_accuracy", "loss"), example, evals, lower_is_better=frozenset({"loss"}))
