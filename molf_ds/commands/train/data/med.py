"""`med`: openlifescienceai/medmcqa (question, opa..opd, cop 0-3 -> 4-way accuracy on validation)."""
from __future__ import annotations

from .base import Choice, Example, Row, Task

LETTERS = ("A", "B", "C", "D")
OPTIONS = ("opa", "opb", "opc", "opd")


def prompt(row: Row) -> str:
    lines = [f"{letter}. {row.text(field).strip()}" for letter, field in zip(LETTERS, OPTIONS)]
    return f"Question: {row.text('question').strip()}\n" + "\n".join(lines) + "\nAnswer:"


def example(row: Row) -> Example:
    return Example(prompt(row), f" {LETTERS[row.integer('cop', 0, 3)]}")


def evals(row: Row) -> list[Choice]:
    return [Choice("accuracy", prompt(row), tuple(f" {letter}" for letter in LETTERS), row.integer("cop", 0, 3))]


TASK = Task("med", ("accuracy",), example, evals)
