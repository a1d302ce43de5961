"""Task loaders on fixture files in each dataset's own schema (json, jsonl, parquet, csv), malformed rows named
by file, row and field, and the loss mask on completion tokens only."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from molf_ds.commands.train.config import DataSection, EvalSection
from molf_ds.commands.train.data import IGNORE_INDEX, Choice, Collator, DataError, Example, Generation, load_task, tokenize
from molf_ds.commands.datagen.demo import build_tokenizer, counterfact_records


def sql_rows(n: int = 4) -> list[dict]:
    return [{
        "id": i, "domain": "retail", "domain_description": "Stores and sales",
        "sql_complexity": "basic SQL", "sql_complexity_description": "basic SQL with a simple select statement",
        "sql_task_type": "analytics and reporting", "sql_task_type_description": "generating reports",
        "sql_prompt": f"How many stores are in region {i}?",
        "sql_context": "" if i == 1 else
        f"CREATE TABLE stores (id INT, region INT); INSERT INTO stores VALUES (1, {i});",
        "sql": f"SELECT COUNT(*) FROM stores WHERE region = {i};",
        "sql_explanation": "Counts the stores of the region.",
    } for i in range(n)]


def med_rows(n: int = 4) -> list[dict]:
    return [{
        "id": f"e9ad821a-c438-4965-9f77-760819dfa15{i}", "question": f"Which nerve supplies muscle {i}?",
        "opa": "Radial", "opb": "Ulnar", "opc": "Median", "opd": "Axillary", "cop": i % 4,
        "choice_type": "single", "exp": "Anatomy texts.", "subject_name": "Anatomy", "topic_name": "Upper limb",
    } for i in range(n)]


def fact_rows(n: int = 4) -> list[dict]:
    return counterfact_records(n, seed=1)


def jsonl_rows(n: int = 4) -> list[dict]:
    return [{"prompt": f"Q: what is {i} + {i}?\nA:", "completion": f" {2 * i}"} for i in range(n)]


ROWS = {"sql": sql_rows, "med": med_rows, "fact": fact_rows, "jsonl": jsonl_rows}
FORMATS = {"sql": ("json", "jsonl", "parquet", "csv"), "med": ("json", "jsonl", "parquet", "csv"),
           "fact": ("json", "jsonl", "parquet"), "jsonl": ("jsonl", "csv")}


def write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def load(task: str, path: Path, **eval_kw):
    return load_task(DataSection(task=task, train=str(path)), EvalSection(**eval_kw))


@pytest.mark.parametrize("task,fmt", [(t, f) for t, fs in FORMATS.items() for f in fs])
def test_loader_reads_each_format(tmp_path, task, fmt):
    path = write(ROWS[task](), tmp_path / f"{task}.{fmt}")
    data = load(task, path, data=str(path))
    assert len(data.train) == 4
    first = data.train[0]
    if task == "sql":
        assert "How many stores are in region 0?" in first.prompt and "CREATE TABLE stores" in first.prompt
        assert first.completion == "SELECT COUNT(*) FROM stores WHERE region = 0;"
        assert "### Context:\n\n" in data.train[1].prompt  # empty context
        assert data.evals[0] == Generation("exact_match", first.prompt, first.completion, normalise="sql")
    elif task == "med":
        assert first.prompt.endswith("D. Axillary\nAnswer:") and first.completion == " A"
        assert data.train[2].completion == " C"
        assert data.evals[1] == Choice("accuracy", data.train[1].prompt, (" A", " B", " C", " D"), 1)
    elif task == "fact":
        record = fact_rows()[0]["requested_rewrite"]
        assert first.prompt == record["prompt"].replace("{}", record["subject"])
        assert first.completion == " " + record["target_new"]["str"]
        metrics = [item.metric for item in data.evals]
        assert metrics.count("efficacy") == 4 and "paraphrase" in metrics and "neighborhood" in metrics
        assert all(item.answer == (1 if item.metric == "neighborhood" else 0) for item in data.evals)
    else:
        assert first.prompt == "Q: what is 0 + 0?\nA:" and first.completion == " 0"


def test_holdout_and_max_samples(tmp_path):
    path = write(sql_rows(10), tmp_path / "sql.jsonl")
    data = load_task(DataSection(task="sql", train=str(path), max_samples=3), EvalSection(holdout=4))
    assert len(data.train) == 3 and len(data.evals) == 4
    assert data.evals[0].target == "SELECT COUNT(*) FROM stores WHERE region = 6;"


def _break(rows: list[dict], index: int, field: str, value) -> list[dict]:
    """A copy of `rows` with row `index`'s dotted `field` set to `value` (None: missing)."""
    rows = json.loads(json.dumps(rows))
    *parents, name = field.split(".")
    node = rows[index]
    for key in parents:
        node = node[key]
    node[name] = value
    return rows


@pytest.mark.parametrize("task,fmt,field,value,problem", [
    ("sql", "jsonl", "sql", None, "is missing"),
    ("sql", "csv", "sql_prompt", None, "is missing"),
    ("med", "parquet", "cop", 7, "must be an integer in [0, 3], got 7"),
    ("med", "json", "opc", None, "is missing"),
    ("fact", "json", "requested_rewrite.target_new.str", None, "is missing"),
    ("fact", "jsonl", "requested_rewrite.prompt", "no placeholder here", "has no '{}' for the subject"),
    ("jsonl", "jsonl", "completion", None, "is missing"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, task, fmt, field, value, problem):
    path = write(_break(ROWS[task](), 2, field, value), tmp_path / f"bad.{fmt}")
    with pytest.raises(DataError) as error:
        load(task, path)
    assert str(error.value).startswith(f"{path}: row 3: field '{field}' {problem}")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=f"{path}: cannot be read as json"):
        load("jsonl", path)


def test_loss_mask_covers_completion_tokens_only():
    tokenizer = build_tokenizer(counterfact_records(8))
    examples = [Example("The profession of Kalo Renmi is", " pilot"), Example("Kalo Renmi works as a", " poet")]
    features, dropped = tokenize(examples, tokenizer, max_length=64)
    assert dropped == 0 and len(features) == len(examples)
    eos = tokenizer.eos_token_id
    for example, feature in zip(examples, features):
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [eos]
        assert feature["input_ids"] == prompt_ids + completion_ids
        assert feature["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    batch = Collator(tokenizer.pad_token_id)(features)
    n = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (2, max(n))
    assert batch["attention_mask"].sum(1).tolist() == n
    short = 0 if n[0] < n[1] else 1
    assert (batch["labels"][short, n[short]:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n[short]:] == tokenizer.pad_token_id).all()
    # a completion cut off entirely by max_length drops the example
    cut, dropped = tokenize(examples, tokenizer, max_length=len(tokenizer(examples[0].prompt)["input_ids"]))
    assert dropped == 1 and len(cut) == 1


def test_task_registry_is_what_every_command_reads():
    """config validation, `molf-ds eval --task`, the CLI help and the metric directions read the one TASKS."""
    from molf_ds.commands.cli import parser
    from molf_ds.commands.train.config import ConfigError, saved_config, validate
    from molf_ds.commands.train.data import TASKS, direction

    root = parser()
    subcommands = root._subparsers._group_actions[0]
    task_option = next(a for a in subcommands.choices["eval"]._actions if a.dest == "task")
    assert tuple(task_option.choices) == tuple(TASKS) == ("sql", "med", "fact", "jsonl", "chat", "alpaca")
    eval_help = next(a.help for a in subcommands._choices_actions if a.dest == "eval")
    assert all(name in eval_help for name in TASKS)
    assert direction("loss") == -1 and direction("exact_match") == direction("token_accuracy") == 1
    assert all(t.metrics and t.direction("loss") == direction("loss") for t in TASKS.values() if "loss" in t.metrics)
    with pytest.raises(ConfigError, match="'data.task': 'nope' is not one of sql, med, fact, jsonl, chat, alpaca"):
        validate(saved_config({"model": {"name_or_path": "m"}, "data": {"task": "nope", "train": "t.jsonl"},
                               "train": {"max_steps": 1, "output_dir": "o"}, "deepspeed": {}}))

