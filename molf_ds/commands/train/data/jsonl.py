"""`jsonl`: generic prompt/completion records (fields `prompt`, `completion`); exact match of the greedy
completion."""
from __future__ import annotations

from .base import Example, Generation, Row, Task



def example(row: Row) -> Example:
    return Example(row.text("prompt"), row.text("completion"))


def evals(row: Row) -> list[Generation]:
    return [Generation("exact_match", row.text("prompt"), row.text("completion").strip())]


TASK = Task("jsonl", ("exact_match",), example, evals)
