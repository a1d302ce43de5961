"""`sql`: gretelai/synthetic_text_to_sql (sql_prompt, sql_context, sql -> exact match on held-out queries)."""
from __future__ import annotations

from .base import Example, Generation, Row, Task

INSTRUCTION = "Write the SQL query that answers the question, given the database context."


def prompt(row: Row) -> str:
    context = row.text("sql_context", empty_ok=True).strip()
    return f"{INSTRUCTION}\n\n### Question:\n{row.text('sql_prompt').strip()}\n\n### Context:\n{context}\n\n### SQL:\n"


def example(row: Row) -> Example:
    return Example(prompt(row), row.text("sql").strip())


def evals(row: Row) -> list[Generation]:
    return [Generation("exact_match", prompt(row), row.text("sql").strip(), normalise="sql")]


TASK = Task("sql", ("exact_match",), example, evals)
