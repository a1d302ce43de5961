"""Text-to-SQL rows in gretelai/synthetic_text_to_sql's schema, generated from question templates over ten small
table schemas; dev and test use schemas (tables, domains, values) that training never sees.

    python -m molf_ds.commands.datagen.sql_templates examples/replication/data   # sql_train/dev/test.jsonl

Every row's `sql_context` is the CREATE TABLE and a two-row INSERT of the tables its query reads; the queries are
SELECT with WHERE, COUNT/AVG/SUM/MAX/MIN (with WHERE or GROUP BY), ORDER BY ... LIMIT, and one JOIN. The output
is deterministic in the seed.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple


@dataclass(frozen=True)
class Schema:
    """A table with a label column (what lists return), a text category, two integer measures, and a parent table
    joined through `fk`. The where-phrases take the value in their `{}`, e.g. "in the {} department"."""

    domain: str
    table: str
    plural: str  # the rows in questions: "employees"
    label: tuple[str, str]  # (column, its plural in questions)
    category: tuple[str, str, str]  # (column, noun in questions, where-phrase)
    categories: tuple[str, ...]
    measures: tuple[tuple[str, str, int, int], ...]  # (column, noun in questions, low, high); joins sum the first
    labels: tuple[str, ...]  # label values for the INSERTs
    parent: str
    fk: str
    parent_column: tuple[str, str]  # (column, where-phrase for the join)
    parent_values: tuple[str, ...]


SCHEMAS: dict[str, Schema] = {s.table: s for s in (
    Schema("human resources", "employees", "employees", ("name", "names"),
           ("department", "department", "in the {} department"), ("Sales", "Finance", "Marketing", "Legal", "IT"),
           (("salary", "salary", 30000, 99000), ("age", "age", 21, 65)),
           ("Ana Silva", "Ben Okafor", "Chen Wei", "Dara Kim", "Eli Novak", "Fatima Zahra"),
           "offices", "office_id", ("city", "whose office is in {}"), ("Boston", "Denver", "Austin", "Seattle")),
    Schema("retail", "products", "products", ("product_name", "product names"),
           ("category", "category", "in the {} category"), ("Toys", "Garden", "Kitchen", "Sports", "Books"),
           (("price", "price", 5, 500), ("stock", "stock", 0, 900)),
           ("Desk Lamp", "Yoga Mat", "Tea Kettle", "Puzzle Box", "Hose Reel", "Chess Set"),
           "suppliers", "supplier_id", ("country", "from suppliers in {}"), ("Vietnam", "Mexico", "Poland", "Kenya")),
    Schema("education", "students", "students", ("name", "names"),
           ("major", "major", "majoring in {}"), ("Physics", "History", "Biology", "Economics", "Music"),
           (("credits", "credits", 0, 160), ("score", "score", 40, 100)),
           ("Liam Ortiz", "Maya Cohen", "Noah Berg", "Omar Haddad", "Priya Nair", "Quinn Lee"),
           "campuses", "campus_id", ("city", "at a campus in {}"), ("Lyon", "Oslo", "Porto", "Leeds")),
    Schema("healthcare", "patients", "patients", ("name", "names"),
           ("ward", "ward", "in the {} ward"), ("Cardiology", "Oncology", "Pediatrics", "Neurology", "Surgery"),
           (("days_admitted", "days admitted", 1, 40), ("age", "age", 1, 95)),
           ("Rosa Diaz", "Sam Patel", "Tara Singh", "Umar Khan", "Vera Ivanova", "Will Chen"),
           "hospitals", "hospital_id", ("region", "treated at hospitals in the {} region"),
           ("North", "South", "East", "West")),
    Schema("sports", "players", "players", ("player_name", "player names"),
           ("position", "position", "who play as {}"), ("Goalkeeper", "Defender", "Midfielder", "Forward"),
           (("goals", "goals", 0, 40), ("matches", "matches", 1, 60)),
           ("Leo Marsh", "Ivan Petrov", "Kofi Mensah", "Luca Rossi", "Mateo Ruiz", "Niko Saari"),
           "teams", "team_id", ("league", "whose team plays in the {}"), ("Premier League", "La Liga", "Serie A")),
    Schema("publishing", "books", "books", ("title", "titles"),
           ("genre", "genre", "in the {} genre"), ("Mystery", "Fantasy", "Romance", "Poetry", "Science"),
           (("pages", "pages", 80, 900), ("copies_sold", "copies sold", 100, 9000)),
           ("Silent Tide", "Iron Garden", "Paper Moons", "The Last Map", "Cold Harbor", "Glass Road"),
           "publishers", "publisher_id", ("country", "from publishers in {}"), ("Canada", "Ireland", "Chile", "India")),
    Schema("transportation", "vehicles", "vehicles", ("model", "models"),
           ("fuel_type", "fuel type", "with fuel type {}"), ("Diesel", "Electric", "Hybrid", "Petrol"),
           (("mileage", "mileage", 1000, 99000), ("capacity", "capacity", 2, 60)),
           ("Volt X2", "Cargo 500", "Metro Bus", "City Van", "Trail 4x4", "Swift S"),
           "depots", "depot_id", ("city", "kept at depots in {}"), ("Leipzig", "Turin", "Ghent", "Bergen")),
    Schema("food service", "dishes", "dishes", ("dish", "dish names"),
           ("cuisine", "cuisine", "from the {} cuisine"), ("Thai", "Mexican", "Italian", "Greek", "Korean"),
           (("calories", "calories", 90, 1400), ("price", "price", 4, 60)),
           ("Pad See Ew", "Tamales", "Risotto", "Moussaka", "Bibimbap", "Gazpacho"),
           "restaurants", "restaurant_id", ("city", "served at restaurants in {}"), ("Lima", "Osaka", "Nairobi")),
    Schema("music", "songs", "songs", ("title", "titles"),
           ("genre", "genre", "in the {} genre"), ("Jazz", "Rock", "Hip Hop", "Folk", "Classical"),
           (("streams", "streams", 1000, 99000), ("duration", "duration", 90, 600)),
           ("Blue Hour", "Neon Rain", "Old River", "Night Drive", "Copper Sky", "Low Tide"),
           "artists", "artist_id", ("country", "by artists from {}"), ("Brazil", "Nigeria", "Sweden", "Japan")),
    Schema("real estate", "properties", "properties", ("address", "addresses"),
           ("property_type", "property type", "of type {}"), ("Condo", "Townhouse", "Villa", "Studio"),
           (("rent", "monthly rent", 500, 9000), ("bedrooms", "bedrooms", 0, 6)),
           ("12 Elm St", "4 Bay Rd", "88 Hill Ave", "7 Oak Ln", "31 Pier Way", "5 Mill Ct"),
           "agents", "agent_id", ("agency", "listed by agents of {}"), ("Keystone", "Harbor Realty", "Summit Homes")),
)}
SPLITS = {"train": ("employees", "products", "students", "patients", "players", "books"),
          "dev": ("vehicles", "dishes"), "test": ("songs", "properties")}
AGGREGATES = {"average": "AVG", "total": "SUM", "highest": "MAX", "lowest": "MIN"}


def _context(s: Schema, rng: random.Random, join: bool) -> str:
    """CREATE TABLE + a two-row INSERT of the table (with its parent and the key column, for a join)."""
    columns = [f"{s.label[0]} VARCHAR(50), {s.category[0]} VARCHAR(30)"]
    columns += [f"{m[0]} INT" for m in s.measures] + ([f"{s.fk} INT"] if join else [])
    parents = rng.sample(s.parent_values, 2)
    rows = []
    for label in rng.sample(s.labels, 2):
        values = [f"'{label}'", f"'{rng.choice(s.categories)}'"]
        values += [str(rng.randint(low, high)) for _, _, low, high in s.measures]
        values += [str(rng.randint(1, 2))] if join else []
        rows.append(f"({', '.join(values)})")
    text = f"CREATE TABLE {s.table} ({', '.join(columns)}); INSERT INTO {s.table} VALUES {', '.join(rows)};"
    if join:
        text += (f" CREATE TABLE {s.parent} (id INT, {s.parent_column[0]} VARCHAR(30)); INSERT INTO {s.parent} "
                 f"VALUES (1, '{parents[0]}'), (2, '{parents[1]}');")
    return text


def _threshold(rng: random.Random, low: int, high: int) -> int:
    """A round number inside (low, high)."""
    step = 10 ** max(0, len(str(high - low)) - 2)
    return rng.randrange(low + step, high, step) // step * step


class Query(NamedTuple):
    question: str
    sql: str
    complexity: str  # gretelai's sql_complexity
    task_type: str  # gretelai's sql_task_type
    explanation: str
    join: bool = False  # the context then holds the parent table too


Template = Callable[[random.Random, Schema], Query]


def _select_where(rng: random.Random, s: Schema) -> Query:
    value = rng.choice(s.categories)
    where = s.category[2].format(value)
    question = rng.choice((f"What are the {s.label[1]} of the {s.plural} {where}?",
                           f"List the {s.label[1]} of all {s.plural} {where}."))
    sql = f"SELECT {s.label[0]} FROM {s.table} WHERE {s.category[0]} = '{value}';"
    return Query(question, sql, "basic SQL", "data retrieval",
                 f"Selects {s.label[0]} from {s.table} for rows whose {s.category[0]} is '{value}'.")


def _select_compare(rng: random.Random, s: Schema) -> Query:
    column, noun, low, high = rng.choice(s.measures)
    n = _threshold(rng, low, high)
    word, op = rng.choice((("more than", ">"), ("less than", "<")))
    question = rng.choice((f"Which {s.plural} have {noun} {word} {n}? Give their {s.label[1]}.",
                           f"List the {s.label[1]} of {s.plural} with {noun} {word} {n}."))
    sql = f"SELECT {s.label[0]} FROM {s.table} WHERE {column} {op} {n};"
    return Query(question, sql, "basic SQL", "data retrieval", f"Selects {s.label[0]} from {s.table} where {column} "
                 f"{op} {n}.")


def _count_where(rng: random.Random, s: Schema) -> Query:
    value = rng.choice(s.categories)
    where = s.category[2].format(value)
    question = rng.choice((f"How many {s.plural} are {where}?", f"Count the {s.plural} {where}."))
    sql = f"SELECT COUNT(*) FROM {s.table} WHERE {s.category[0]} = '{value}';"
    return Query(question, sql, "aggregation", "analytics and reporting",
                 f"Counts the rows of {s.table} whose {s.category[0]} is '{value}'.")


def _aggregate_where(rng: random.Random, s: Schema) -> Query:
    value = rng.choice(s.categories)
    column, noun, _, _ = rng.choice(s.measures)
    word, function = rng.choice(list(AGGREGATES.items()))
    question = f"What is the {word} {noun} of {s.plural} {s.category[2].format(value)}?"
    sql = f"SELECT {function}({column}) FROM {s.table} WHERE {s.category[0]} = '{value}';"
    return Query(question, sql, "aggregation", "analytics and reporting",
                 f"Computes {function}({column}) over the {s.table} whose {s.category[0]} is '{value}'.")


def _group_by(rng: random.Random, s: Schema) -> Query:
    column, noun, _, _ = rng.choice(s.measures)
    word, function = rng.choice([("number of", "COUNT")] + list(AGGREGATES.items()))
    target, what = ("*", s.plural) if function == "COUNT" else (column, noun)
    question = rng.choice((f"What is the {word} {what} for each {s.category[1]}?",
                           f"Show the {word} {what} per {s.category[1]}."))
    sql = f"SELECT {s.category[0]}, {function}({target}) FROM {s.table} GROUP BY {s.category[0]};"
    return Query(question, sql, "aggregation", "analytics and reporting",
                 f"Groups {s.table} by {s.category[0]} and computes {function}({target}) per group.")


def _top(rng: random.Random, s: Schema) -> Query:
    column, noun, _, _ = rng.choice(s.measures)
    k = rng.choice((2, 3, 5))
    word, order = rng.choice((("highest", "DESC"), ("lowest", "ASC")))
    question = rng.choice((f"List the {s.label[1]} of the {k} {s.plural} with the {word} {noun}.",
                           f"Which {k} {s.plural} have the {word} {noun}?"))
    sql = f"SELECT {s.label[0]} FROM {s.table} ORDER BY {column} {order} LIMIT {k};"
    return Query(question, sql, "basic SQL", "data retrieval",
                 f"Orders {s.table} by {column} {order} and returns the first {k} {s.label[0]} values.")


def _join(rng: random.Random, s: Schema) -> Query:
    value = rng.choice(s.parent_values)
    a, b = s.table[0], s.parent[0]  # aliases: the tables' initials (distinct in every schema)
    on = f"{s.table} {a} JOIN {s.parent} {b} ON {a}.{s.fk} = {b}.id WHERE {b}.{s.parent_column[0]} = '{value}'"
    where = s.parent_column[1].format(value)
    explanation = f"Joins {s.table} with {s.parent} on {s.fk}, keeping rows whose {s.parent_column[0]} is '{value}'."
    if rng.random() < 0.5:
        return Query(f"List the {s.label[1]} of {s.plural} {where}.", f"SELECT {a}.{s.label[0]} FROM {on};",
                     "single join", "data retrieval", explanation, True)
    column, noun, _, _ = s.measures[0]
    return Query(f"What is the total {noun} of {s.plural} {where}?", f"SELECT SUM({a}.{column}) FROM {on};",
                 "single join", "analytics and reporting", explanation, True)


TEMPLATES: tuple[Template, ...] = (_select_where, _select_compare, _count_where, _aggregate_where, _group_by, _top,
                                   _join)


def rows(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows of `split` (its own schemas), templates taken in turn, the rest drawn from a seeded RNG."""
    rng = random.Random(f"sql-{split}-{seed}")
    schemas = [SCHEMAS[name] for name in SPLITS[split]]
    out = []
    for i in range(n):
        schema = schemas[i % len(schemas)]
        query = TEMPLATES[i // len(schemas) % len(TEMPLATES)](rng, schema)
        out.append({"id": i, "domain": schema.domain, "sql_complexity": query.complexity,
                    "sql_task_type": query.task_type, "sql_prompt": query.question,
                    "sql_context": _context(schema, rng, query.join), "sql": query.sql,
                    "sql_explanation": query.explanation})
    return out


def write(out_dir: str | Path, sizes: dict[str, int], seed: int = 0) -> list[Path]:
    """sql_{split}.jsonl per split under `out_dir`, one JSON object per line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, n in sizes.items():
        path = out / f"sql_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(split, n, seed)))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molf_ds.commands.datagen.sql_templates", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write(args.out_dir, {"train": args.train, "dev": args.dev, "test": args.test}, args.seed):
        print(path)


if __name__ == "__main__":
    main()
