"""`alpaca`: instruction tuning rows (`instruction`, optional `input`, `output`) in the Stanford Alpaca prompt
template, whatever the tokenizer (for the chat template, write the rows as `chat` messages); the loss on the
output (+ EOS). Evaluation as for `chat`: token accuracy and mean loss on the evaluation rows' outputs."""
from __future__ import annotations

from .base import Example, Likelihood, Row, Task

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def prompt(row: Row) -> str:
    instruction, extra = row.text("instruction").strip(), row.text("input", empty_ok=True).strip()
    if extra:
        return WITH_INPUT.format(instruction=instruction, input=extra)
    return WITHOUT_INPUT.format(instruction=instruction)


def example(row: Row) -> Example:
    return Example(prompt(row), row.text("output").strip())


def evals(row: Row) -> list[Likelihood]:
    return [Likelihood(example(row))]


TASK = Task("alpaca", ("token_accuracy", "loss"), example, evals, lower_is_better=frozenset({"loss"}))
