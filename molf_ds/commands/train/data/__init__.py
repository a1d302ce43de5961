"""Tasks: one module per dataset schema (sql, med, fact, jsonl, chat, alpaca), each with `example(row)` (training
pair or conversation), `evals(row)` (evaluation items) and METRICS."""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

from ..config import DataSection, EvalSection
from . import alpaca, chat, fact, jsonl, med, sql
from .base import Choice, Conversation, DataError, Example, Generation, Likelihood, open_table, rows
from .tokenize import IGNORE_INDEX, Collator, encode, pack, pad_id, tokenize

TASKS: dict[str, ModuleType] = {"sql": sql, "med": med, "fact": fact, "jsonl": jsonl, "chat": chat,
                                 "alpaca": alpaca}
LOWER_IS_BETTER = frozenset({"loss"})  # every other metric of the tasks: higher is better


def direction(metric: str) -> int:
    """+1 where a higher `metric` is better, -1 where a lower one is (loss)."""
    return -1 if metric in LOWER_IS_BETTER else 1


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
    return TaskData(train, evals, task.METRICS)


__all__ = ["TASKS", "TaskData", "load_task", "Choice", "Generation", "Likelihood", "Example", "Conversation",
           "DataError", "IGNORE_INDEX", "Collator", "encode", "pack", "pad_id", "tokenize"]
