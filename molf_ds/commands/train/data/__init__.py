"""Tasks: one module per dataset schema (sql, med, fact, jsonl, chat, alpaca), each ending with its `Task`
(`example(row)`: training pair or conversation, `evals(row)`: evaluation items, the metrics and their
directions). A new task is one module here plus its row in TASKS: config validation (data.task, eval.metric),
`molf-ds eval --task`, the CLI help and the best-model comparison all read TASKS."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import alpaca, chat, fact, jsonl, med, sql
from .base import Choice, Conversation, DataError, Example, Generation, Likelihood, Task, open_table, rows
from .tokenize import IGNORE_INDEX, Collator, encode, pack, pad_id, tokenize

if TYPE_CHECKING:  # the config sections import nothing from here; only the annotations name them
    from ..config import DataSection, EvalSection

TASKS: dict[str, Task] = {t.name: t for t in (sql.TASK, med.TASK, fact.TASK, jsonl.TASK, chat.TASK, alpaca.TASK)}


def direction(metric: str) -> int:
    """+1 where a higher `metric` is better, -1 where a lower one is (loss), whichever task scores it."""
    return -1 if any(metric in task.lower_is_better for task in TASKS.values()) else 1


@dataclass
class TaskData:
    train: list[Example | Conversation]
    evals: list[Choice | Generation | Likelihood]
    metrics: tuple[str, ...]


def load_task(data: DataSection, evaluation: EvalSection) -> TaskData:
    """Training examples of `data.train` and evaluation items (from `eval.data`, or `eval.holdout` rows
    carved from the end of `data.train`); every row used is checked."""
    task = TASKS[data.task]
    where, table = open_table(data.train, data.split)
    n_train = len(table) - evaluation.holdout
    if n_train < 1:
        raise DataError(f"{where}: {len(table)} rows leave none for training after eval.holdout={evaluation.holdout}")
    train_range = range(min(n_train, data.max_samples or n_train))
    train = [task.example(row) for row in rows(where, table, train_range)]
    eval_rows = []
    if evaluation.holdout:
        eval_rows = rows(where, table, range(n_train, n_train + min(evaluation.holdout, evaluation.max_samples
                                                                    or evaluation.holdout)))
    elif evaluation.data is not None:
        eval_where, eval_table = open_table(evaluation.data, evaluation.split)
        eval_rows = rows(eval_where, eval_table, range(min(len(eval_table), evaluation.max_samples or len(eval_table))))
    evals = [replace(item, max_length=data.max_length) if isinstance(item, Likelihood) else item  # the training cut
             for row in eval_rows for item in task.evals(row)]
    return TaskData(train, evals, task.metrics)


__all__ = ["TASKS", "Task", "direction", "TaskData", "load_task", "Choice", "Generation", "Likelihood", "Example",
           "Conversation", "DataError", "IGNORE_INDEX", "Collator", "encode", "pack", "pad_id", "tokenize"]
