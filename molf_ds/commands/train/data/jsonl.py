"""`jsonl`: generic prompt/completion records (fields `prompt`, `completion`); exact match of the greedy
completion."""
from __future__ import annotations

from .base import Example, Generation, Row

METRICS = ("exact_match",)


def example(row: Row) -> Example:
    return Example(row.text("prompt"), row.text("completion"))


def evals(row: Row) -> list[Generation]:
    return [Generation("exact_match", row.text("prompt"), row.text("completion").strip())]
