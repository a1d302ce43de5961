"""Well-known facts as counterfactual rewrites in CounterFact's schema, and a probe that keeps the ones a
pretrained model already knows (CounterFact's premise: the model must hold the fact that the rewrite replaces).

    python -m molf_ds.commands.datagen.known_facts runs/demo/counterfact.json --model smollm2-135m [--dev-output dev.json]

Each subject's rewrite moves it to another object of the same relation; its paraphrase prompts ask the same
question in other words, its neighborhood prompts ask about subjects that share the true object (they must
keep it). The probe compares P(true) with P(new) on the rewrite prompt, as the `fact` task's efficacy does.
Neighbours are known facts set aside from the rewrites (`with_unseen_neighbours`): no split trains a subject that
another rewrite's neighbourhood asks about, so a successful rewrite never counts against neighbourhood.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from ..loading import load_model
from ..train.data.base import Row
from ..train.data.fact import evals
from ..train.evaluate import mean_logliks

NEIGHBOURS = 3  # neighbourhood prompts per rewrite, at most
# relation id -> (rewrite prompt, paraphrase prompts...), {true object: subjects}
RELATIONS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "P17": (("{} is a city in the country of", "The city of {} is located in", "{} lies in the country of"), {
        "France": ("Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Nice"),
        "Japan": ("Tokyo", "Osaka", "Kyoto", "Hiroshima", "Nagoya", "Sapporo"),
        "Germany": ("Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart"),
        "Italy": ("Rome", "Milan", "Venice", "Florence", "Naples", "Turin"),
        "Spain": ("Madrid", "Barcelona", "Seville", "Valencia", "Bilbao", "Granada"),
        "Russia": ("Moscow", "Saint Petersburg", "Novosibirsk", "Kazan", "Yekaterinburg", "Vladivostok"),
        "China": ("Beijing", "Shanghai", "Guangzhou", "Shenzhen", "Wuhan", "Chengdu"),
        "India": ("Mumbai", "Delhi", "Bangalore", "Kolkata", "Chennai", "Hyderabad"),
        "Australia": ("Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Canberra"),
        "Canada": ("Toronto", "Vancouver", "Montreal", "Ottawa", "Calgary", "Winnipeg"),
        "Brazil": ("Rio de Janeiro", "Sao Paulo", "Brasilia", "Salvador", "Recife", "Fortaleza"),
        "Egypt": ("Cairo", "Alexandria", "Luxor", "Giza", "Aswan", "Port Said"),
    }),
    "P37": (("The official language of {} is", "In {}, the official language is", "People in {} speak"), {
        "Spanish": ("Spain", "Mexico", "Argentina", "Colombia", "Chile", "Peru"),
        "French": ("France", "Senegal", "Haiti", "Monaco"),
        "German": ("Germany", "Austria", "Liechtenstein"),
        "Portuguese": ("Portugal", "Brazil", "Angola", "Mozambique"),
        "Arabic": ("Saudi Arabia", "Egypt", "Iraq", "Jordan", "Syria"),
        "English": ("Australia", "New Zealand", "Jamaica", "Ireland"),
        "Japanese": ("Japan",),
        "Russian": ("Russia", "Belarus"),
        "Italian": ("Italy", "San Marino"),
    }),
    "P276": (("{} is located in the city of", "You can visit {} in the city of", "The city that is home to {} is"), {
        "Paris": ("the Eiffel Tower", "the Louvre", "the Arc de Triomphe", "Notre-Dame Cathedral"),
        "Rome": ("the Colosseum", "the Pantheon", "the Trevi Fountain", "the Roman Forum"),
        "London": ("Big Ben", "Buckingham Palace", "the Tower of London", "Trafalgar Square"),
        "New York": ("the Statue of Liberty", "Central Park", "the Empire State Building", "Times Square"),
        "Berlin": ("the Brandenburg Gate", "the Reichstag building", "Checkpoint Charlie"),
        "Moscow": ("the Kremlin", "Red Square", "Saint Basil's Cathedral"),
        "Athens": ("the Acropolis", "the Parthenon"),
        "Barcelona": ("the Sagrada Familia", "Park Guell", "Camp Nou"),
        "Sydney": ("the Sydney Opera House", "the Sydney Harbour Bridge", "Bondi Beach"),
        "Agra": ("the Taj Mahal",),
    }),
    "P36": (("The capital of {} is", "The capital city of {} is", "{}'s capital city is"), {
        obj: (subject,) for subject, obj in (
            ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("England", "London"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Canada", "Ottawa"),
            ("Australia", "Canberra"), ("Argentina", "Buenos Aires"), ("Kenya", "Nairobi"))
    }),
}


def counterfact_records(seed: int = 0) -> list[dict[str, Any]]:
    """Every subject of every relation as one rewrite, in CounterFact's schema; deterministic in `seed`. Its
    neighbourhood prompts are the other subjects with the same true object, rewrites themselves: a data set takes
    them through `with_unseen_neighbours`."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for relation, (templates, by_object) in RELATIONS.items():
        objects = list(by_object)
        for true, subjects in by_object.items():
            for subject in subjects:
                new = rng.choice([o for o in objects if o != true])
                neighbors = [s for s in subjects if s != subject][:NEIGHBOURS]
                records.append({
                    "case_id": len(records),
                    "requested_rewrite": {
                        "prompt": templates[0], "subject": subject, "relation_id": relation,
                        "target_new": {"str": new, "id": f"{relation}:{new}"},
                        "target_true": {"str": true, "id": f"{relation}:{true}"},
                    },
                    "paraphrase_prompts": [t.format(subject) for t in templates[1:]],
                    "neighborhood_prompts": [templates[0].format(s) for s in neighbors],
                    "attribute_prompts": [templates[0].format(s) for s in by_object[new][:3]],
                    "generation_prompts": [f"{subject} is known for"],
                })
    return records


def known(model: Any, tokenizer: Any, records: list[dict[str, Any]], batch_size: int = 32) -> list[dict[str, Any]]:
    """The records whose true object the model prefers to the new one on the rewrite prompt."""
    firsts = [evals(Row("known facts", i + 1, record))[0] for i, record in enumerate(records)]
    pairs = [(item.prompt, option) for item in firsts for option in item.options]
    scores = mean_logliks(model, tokenizer, pairs, batch_size, "cpu")
    return [record for i, record in enumerate(records) if scores[2 * i + 1] > scores[2 * i]]


def with_unseen_neighbours(records: list[dict[str, Any]], seed: int = 0,
                           most: int = NEIGHBOURS) -> list[dict[str, Any]]:
    """The rewrites to train, each asking in its neighbourhood about facts that share its true object and are
    never rewritten: per relation and true object, a seeded min(`most`, n // 2) of its n facts (in `records`, e.g.
    the ones a model knows) become neighbours only, and the others keep their rewrite with those as neighbours. A
    true object with one fact (a country's capital) keeps its rewrite without neighbours."""
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        rewrite = record["requested_rewrite"]
        groups.setdefault((rewrite["relation_id"], rewrite["target_true"]["str"]), []).append(record)
    neighbour_ids: set[int] = set()
    prompts: dict[tuple[str, str], list[str]] = {}
    for key, group in groups.items():
        aside = sorted(rng.sample(group, min(most, len(group) // 2)), key=lambda r: r["case_id"])
        neighbour_ids.update(r["case_id"] for r in aside)
        prompts[key] = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in aside]
    return [{**record, "neighborhood_prompts": prompts[(record["requested_rewrite"]["relation_id"],
                                                        record["requested_rewrite"]["target_true"]["str"])]}
            for record in records if record["case_id"] not in neighbour_ids]


def split_dev(records: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(dev, rest): a seeded half of each relation's records (rounded down) for choosing hyperparameters, and the
    others, in their original order."""
    rng = random.Random(seed)
    dev: set[int] = set()
    for relation in RELATIONS:
        ids = [r["case_id"] for r in records if r["requested_rewrite"]["relation_id"] == relation]
        dev.update(rng.sample(ids, len(ids) // 2))
    return [r for r in records if r["case_id"] in dev], [r for r in records if r["case_id"] not in dev]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    print(f"{path}: {len(records)} of them as counterfactual rewrites")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molf_ds.commands.datagen.known_facts", description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="the CounterFact JSON to write")
    parser.add_argument("--model", required=True, help="a registry name, a model directory or a run directory")
    parser.add_argument("--max-cases", type=int, help="keep at most this many (a seeded sample across relations)")
    parser.add_argument("--seed", type=int, default=0, help="picks each rewrite's new object and the sample")
    parser.add_argument("--dev-output", type=Path, help="also write a dev split here: half of each relation's rewrites, "
                        "which OUTPUT then leaves out (before --max-cases)")
    parser.add_argument("--dev-seed", type=int, default=1, help="picks the dev half [1]")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    records = counterfact_records(args.seed)
    kept = known(model, tokenizer, records)
    print(f"{args.model} knows {len(kept)} of the {len(records)} facts")
    kept = with_unseen_neighbours(kept, args.seed)
    print(f"{len(kept)} of them rewritten, the others kept as neighbours only")
    if args.dev_output is not None:
        dev, kept = split_dev(kept, args.dev_seed)
        _write(args.dev_output, dev)
    if args.max_cases is not None and len(kept) > args.max_cases:
        kept = sorted(random.Random(args.seed).sample(kept, args.max_cases), key=lambda r: r["case_id"])
    _write(args.output, kept)


if __name__ == "__main__":
    main()
