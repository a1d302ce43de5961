"""The replication's shipped data (examples/replication/data): the text-to-SQL generator is deterministic, its rows
load through the `sql` task, parse with sqlglot and run in SQLite, dev and test schemas never appear in training,
and the shipped files are what the generator writes; the fact files are disjoint dev/test halves of known facts."""
from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import sqlglot

from molf_ds.commands.datagen import city_codes, sql_templates
from molf_ds.commands.train.config import DataSection, EvalSection, load_config
from molf_ds.commands.train.data import Generation, load_task
from molf_ds.commands.train.evaluate import sql_match
from molf_ds.commands.datagen.known_facts import (NEIGHBOURS, RELATIONS, counterfact_records, split_dev,
                                                  with_unseen_neighbours)

DATA = Path(__file__).parent.parent / "examples" / "replication" / "data"
SPLITS = ("train", "dev", "test")


def shipped(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"sql_{split}.jsonl").read_text().splitlines()]


def test_generator_is_deterministic_in_the_seed():
    assert sql_templates.rows("train", 40, seed=0) == sql_templates.rows("train", 40, seed=0)
    assert sql_templates.rows("train", 40, seed=0) != sql_templates.rows("train", 40, seed=1)


def test_shipped_files_are_the_generators_output(tmp_path):
    sizes = {split: len(shipped(split)) for split in SPLITS}
    assert sizes == {"train": 600, "dev": 100, "test": 150}
    for path in sql_templates.write(tmp_path, sizes, seed=0):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), path.name


@pytest.mark.parametrize("split", SPLITS)
def test_rows_load_parse_and_run(split):
    data = load_task(DataSection(task="sql", train=str(DATA / "sql_train.jsonl")),
                     EvalSection(data=str(DATA / f"sql_{split}.jsonl")))
    rows = shipped(split)
    assert len(data.evals) == len(rows) and all(isinstance(item, Generation) for item in data.evals)
    assert {row["sql_complexity"] for row in rows} == {"basic SQL", "aggregation", "single join"}
    for row, item in zip(rows, data.evals):
        assert item.target == row["sql"] and row["sql_context"] in item.prompt
        sqlglot.parse_one(row["sql"], error_level=sqlglot.ErrorLevel.RAISE)
        assert sql_match(row["sql"].lower().rstrip(";"), row["sql"])  # the metric's normalisation holds
        database = sqlite3.connect(":memory:")
        database.executescript(row["sql_context"])
        database.execute(row["sql"]).fetchall()


def test_dev_and_test_schemas_never_appear_in_training():
    def words(rows: list[dict]) -> set[str]:
        return {w for row in rows for w in re.findall(r"\w+", row["sql_context"] + " " + row["sql"])}

    def values(rows: list[dict]) -> set[str]:
        return {v for row in rows for v in re.findall(r"'([^']*)'", row["sql_context"] + row["sql"])}

    train = shipped("train")
    for split in ("dev", "test"):
        rows = shipped(split)
        tables = {sql_templates.SCHEMAS[name].table for name in sql_templates.SPLITS[split]}
        assert tables & words(train) == set() and tables <= words(rows)
        assert {row["domain"] for row in rows}.isdisjoint(row["domain"] for row in train)
        assert values(rows).isdisjoint(values(train))  # category, label and parent values are the schemas' own
    for schema in sql_templates.SCHEMAS.values():  # join aliases are the tables' initials
        assert schema.table[0] != schema.parent[0]


def test_fact_dev_split_takes_half_of_each_relation():
    records = counterfact_records()
    dev, test = split_dev(records, seed=1)
    assert (dev, test) == split_dev(records, seed=1) and dev != split_dev(records, seed=2)[0]
    assert {r["case_id"] for r in dev}.isdisjoint(r["case_id"] for r in test) and len(dev) + len(test) == len(records)
    for relation in RELATIONS:
        n = sum(r["requested_rewrite"]["relation_id"] == relation for r in records)
        assert sum(r["requested_rewrite"]["relation_id"] == relation for r in dev) == n // 2


def _rewritten_prompts(records: list[dict]) -> set[str]:
    return {r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records}


def _assert_neighbours_unseen(records: list[dict]) -> None:
    """Every neighbourhood prompt asks about a subject with the rewrite's true object that no record rewrites."""
    rewritten = _rewritten_prompts(records)
    for record in records:
        rewrite = record["requested_rewrite"]
        templates, by_object = RELATIONS[rewrite["relation_id"]]
        same_object = {templates[0].format(s) for s in by_object[rewrite["target_true"]["str"]]}
        neighbours = record["neighborhood_prompts"]
        assert set(neighbours) <= same_object - rewritten and len(neighbours) <= NEIGHBOURS, (rewrite, neighbours)


def test_neighbours_are_never_rewritten():
    records = counterfact_records()
    assert not set.isdisjoint(*[{p for r in records for p in r["neighborhood_prompts"]}, _rewritten_prompts(records)])
    kept = with_unseen_neighbours(records)
    _assert_neighbours_unseen(kept)
    for record in kept:  # every fact known: min(3, n // 2) of a true object's n subjects are neighbours
        templates, by_object = RELATIONS[record["requested_rewrite"]["relation_id"]]
        n = len(by_object[record["requested_rewrite"]["target_true"]["str"]])
        assert len(record["neighborhood_prompts"]) == min(NEIGHBOURS, n // 2)
    assert kept == with_unseen_neighbours(records) and kept != with_unseen_neighbours(records, seed=1)
    assert len(kept) + sum(min(NEIGHBOURS, len(s) // 2) for _, by in RELATIONS.values() for s in by.values()) == \
        len(records)


def test_shipped_fact_files_are_disjoint_counterfact_rewrites():
    halves = {split: json.loads((DATA / f"facts_smollm2_{split}.json").read_text()) for split in ("dev", "test")}
    kept = sorted(halves["dev"] + halves["test"], key=lambda r: r["case_id"])
    assert split_dev(kept, seed=1) == (halves["dev"], halves["test"])  # --dev-output's split, --dev-seed 1
    _assert_neighbours_unseen(kept)  # across both halves: neither trains a neighbour
    by_id = {r["case_id"]: r for r in counterfact_records()}  # the probe keeps records, neighbours set aside
    assert all({**by_id[r["case_id"]], "neighborhood_prompts": r["neighborhood_prompts"]} == r
               for rows in halves.values() for r in rows)
    data = load_task(DataSection(task="fact", train=str(DATA / "facts_smollm2_test.json")),
                     EvalSection(data=str(DATA / "facts_smollm2_test.json")))
    assert len(data.train) == len(halves["test"]) and data.metrics == ("efficacy", "paraphrase", "neighborhood")


def test_shipped_city_codes_split_each_countrys_known_cities():
    rows = {split: [json.loads(line) for line in (DATA / f"city_codes_{split}.jsonl").read_text().splitlines()]
            for split in SPLITS}
    prefix, suffix = city_codes.PROMPT.split("{}")
    cities = {split: [r["prompt"].removeprefix(prefix).removesuffix(suffix) for r in found]
              for split, found in rows.items()}
    assert all(city_codes.PROMPT.format(c) == r["prompt"] for s in SPLITS for c, r in zip(cities[s], rows[s]))
    every = [c for found in cities.values() for c in found]
    assert len(every) == len(set(every))  # no city in two splits
    for split, found in rows.items():
        for city, row in zip(cities[split], found):
            code, names = city_codes.COUNTRIES[row["country"]]
            assert row["completion"] == f" {code}" and city in names
    kept = {country: [c for c in names if c in every] for country, (_, names) in city_codes.COUNTRIES.items()}
    assert city_codes.splits(kept, seed=0) == rows  # the generator's split of the cities the probe kept
    per_country = {s: Counter(r["country"] for r in rows[s]) for s in SPLITS}
    assert set(per_country["train"].values()) == {city_codes.TRAIN_PER_COUNTRY}
    assert set(per_country["dev"].values()) == {city_codes.DEV_PER_COUNTRY}
    assert min(per_country["test"].values()) >= city_codes.TEST_AT_LEAST
    assert per_country["train"].keys() == per_country["dev"].keys() == per_country["test"].keys()
    codes = [city_codes.COUNTRIES[c][0] for c in city_codes.COUNTRIES]
    assert len(set(codes)) == len(codes)  # one word per country


def test_noisy_city_codes_mislabel_one_training_row_per_country():
    train, noisy = ([json.loads(line) for line in (DATA / f"city_codes_{name}.jsonl").read_text().splitlines()]
                    for name in ("train", "train_noisy"))
    assert city_codes.mislabelled(train) == noisy
    changed = [(a, b) for a, b in zip(train, noisy) if a != b]
    assert sorted(a["country"] for a, _ in changed) == sorted({r["country"] for r in train})  # one row each
    words = {f" {word}" for word, _ in city_codes.COUNTRIES.values()}
    assert all(b["completion"] in words - {a["completion"]} and a["prompt"] == b["prompt"] for a, b in changed)


@pytest.mark.parametrize("task, yaml_name", [("fact", "fact"), ("sql", "sql"), ("jsonl", "city_codes")])
def test_configs_validate_for_every_method(task, yaml_name, monkeypatch):
    from molf_ds.commands.compare import run_overrides
    from molf_ds.commands.methods import COMPARE_METHODS

    monkeypatch.chdir(DATA.parents[2])  # the configs' paths start at the repository root, as run.sh runs them
    for method in COMPARE_METHODS:
        own = ["molf.lora_ranks=[32,128]", "molf.lora_alphas=[32,32]"] if method == "molf-e" else []
        cfg = load_config(DATA.parent / f"{yaml_name}_smollm2.yaml", run_overrides([], method, own, 0, Path("out")))
        assert cfg.method == method and cfg.data.task == task
        assert Path(cfg.data.train).is_file() and Path(cfg.eval.data).is_file()
