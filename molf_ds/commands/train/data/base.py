"""Reading a task's rows from a hub id or a local json/jsonl/parquet/csv file, and checking their fields.

A malformed row raises `DataError` naming the file, the row (records counted from 1, a CSV header not
counted) and the field.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ...sources import FORMATS, is_local



class DataError(ValueError):
    """A dataset that cannot be read or a malformed row."""


@dataclass(frozen=True)
class Example:
    """One training pair: the loss covers the completion's tokens only."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Conversation:
    """A chat (`messages`: (role, content) pairs, roles system / user / assistant) rendered with the tokenizer's
    chat template; the loss covers every assistant turn. `where`: the file and row, for errors at rendering."""

    messages: tuple[tuple[str, str], ...]
    where: str


@dataclass(frozen=True)
class Choice:
    """Correct when option `answer` has the highest mean log-likelihood as a completion of `prompt`."""

    metric: str
    prompt: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Generation:
    """Correct when the greedy completion of `prompt` equals `target` (whitespace-normalised; `normalise="sql"`:
    SQL-normalised, see evaluate.normalise_sql)."""

    metric: str
    prompt: str
    target: str
    normalise: str = "whitespace"


@dataclass(frozen=True)
class Likelihood:
    """Teacher-forced scoring of a training pair or conversation: `token_accuracy` (share of the loss tokens that
    are the argmax prediction) and `loss` (mean cross-entropy per loss token), both over all items' tokens;
    `max_length`: the training cut (data.max_length), None: no cut."""

    example: "Example | Conversation"
    max_length: int | None = None


class Row:
    """One record with typed field access; `where` is the file (or hub id and split), `number` counts from 1."""

    def __init__(self, where: str, number: int, record: dict[str, Any], prefix: str = "") -> None:
        self.where, self.number, self.record, self.prefix = where, number, record, prefix

    def fail(self, name: str, problem: str) -> DataError:
        return DataError(f"{self.where}: row {self.number}: field '{self.prefix}{name}' {problem}")

    def _get(self, name: str) -> Any:
        if name not in self.record or self.record[name] is None:
            raise self.fail(name, "is missing")
        return self.record[name]

    def text(self, name: str, empty_ok: bool = False) -> str:
        if empty_ok and self.record.get(name) is None:
            return ""
        value = self._get(name)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {value!r}")
        if not empty_ok and not value.strip():
            raise self.fail(name, "is empty")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self._get(name)
        if isinstance(value, str):  # CSV
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(name, f"must be an integer in [{low}, {high}], got {value!r}")
        return value

    def texts(self, name: str) -> list[str]:
        value = self.record.get(name)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"must be a list of strings, got {value!r}")
        return list(value)

    def records(self, name: str) -> list["Row"]:
        """The objects of list field `name`, each a Row whose fields are named `name[i].field`."""
        value = self._get(name)
        if not isinstance(value, (list, tuple)) or not value:
            raise self.fail(name, f"must be a non-empty list of objects, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{name}[{i}]", f"must be an object, got {item!r}")
        return [Row(self.where, self.number, item, f"{self.prefix}{name}[{i}].") for i, item in enumerate(value)]

    def mapping(self, name: str) -> "Row":
        value = self._get(name)
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, got {value!r}")
        return Row(self.where, self.number, value, f"{self.prefix}{name}.")


class Task:
    """A dataset schema `molf-ds train` (data.task) and `molf-ds eval` (--task) read: `example(row)` (a training
    pair or conversation), `evals(row)` (its evaluation items), the metrics those items score, and which of them
    are better lower (`loss`; every other metric: higher is better). One module per task in train/data/ ends
    with its TASK; train/data/__init__.py's TASKS lists them."""

    def __init__(self, name: str, metrics: tuple[str, ...], example: Callable[[Row], Example | Conversation],
                 evals: Callable[[Row], list[Choice | Generation | Likelihood]],
                 lower_is_better: frozenset[str] = frozenset()) -> None:
        self.name, self.metrics, self.example, self.evals = name, metrics, example, evals
        self.lower_is_better = lower_is_better

    def direction(self, metric: str) -> int:
        """+1 where a higher `metric` is better, -1 where a lower one is."""
        return -1 if metric in self.lower_is_better else 1


def open_table(source: str, split: str) -> tuple[str, Any]:
    """(where, datasets.Dataset) of a local file (its one split) or of a hub dataset's `split`."""
    import datasets

    datasets.disable_progress_bars()
    if not is_local(source):
        return f"{source} (split {split})", datasets.load_dataset(source, split=split)
    path = Path(source)
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise DataError(f"{path}: unknown file type: use one of {', '.join(FORMATS)}")
    options = {}
    if fmt == "csv":  # CSV has no types: read every column as text, so that a completion like " 42" stays one
        with open(path, newline="", encoding="utf-8") as file:
            header = next(csv.reader(file), [])
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        return str(path), datasets.load_dataset(fmt, data_files=str(path), split="train", **options)
    except Exception as error:  # datasets wraps the parser's error
        cause = error.__cause__ or error
        raise DataError(f"{path}: cannot be read as {fmt}: {cause}".replace("\n", " ")) from None


def rows(where: str, table: Any, indices: range) -> Iterator[Row]:
    for number, record in enumerate(table.select(indices), start=indices.start + 1):
        yield Row(where, number, record)
