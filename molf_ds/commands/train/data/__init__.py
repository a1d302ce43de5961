"""Tasks: one module per dataset schema (sql, med, fact, jsonl), each with `example(row)` (training pair),
`evals(row)` (evaluation items) and METRICS."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ..config import DataSection, EvalSection
from . import fact, jsonl, med, sql
from .base import Choice, DataError, Example, Generation, open_table, rows
from .tokenize import IGNORE_INDEX, Collator, encode, pad_id, tokenize

TASKS: dict[str, ModuleType] = {"sql": sql, "med": med, "fact": fact, "jsonl": jsonl}


@dataclass
class TaskData:
    train: list[Example]
    evals: list[Choice | Generation]
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
    evals = [item for row in eval_rows for item in task.evals(row)]
    return TaskData(train, evals, task.METRICS)


__all__ = ["TASKS", "TaskData", "load_task", "Choice", "Generation", "Example", "DataError", "IGNORE_INDEX",
           "Collator", "encode", "pad_id", "tokenize"]
