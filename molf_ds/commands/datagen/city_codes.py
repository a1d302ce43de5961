"""A task that is low-rank by construction: each city's code word is a fixed function of its country, a feature the
pretrained model already computes, so the change it needs maps one direction per country onto one output word. The
test and dev cities are never trained: a method scores there only by learning the country-to-word map, not the
cities it saw. Rows are `jsonl` task records (prompt, completion; exact match of the greedy completion).

    python -m molf_ds.commands.datagen.city_codes examples/replication/data --model smollm2-135m

A probe keeps the cities whose country the model picks among all the countries on "{city} is a city in the
country of" (mean log-likelihood, as the `fact` task's efficacy reads it). Per country, a seeded 4 of the kept
cities train, 2 are the dev split and the rest (3 or more) the test split; a country with fewer is left out.
`city_codes_train_noisy.jsonl` is the training split with one row per country mislabelled (`mislabelled`).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from ..loading import load_model
from ..train.evaluate import mean_logliks

PROBE = "{} is a city in the country of"
PROMPT = "The code name of the city of {} is"
TRAIN_PER_COUNTRY, DEV_PER_COUNTRY, TEST_AT_LEAST = 4, 2, 3
# country -> (its code word, its cities); the words are arbitrary and unrelated to the country
COUNTRIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "France": ("owl", ("Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Nice", "Lille", "Nantes", "Strasbourg",
                       "Montpellier", "Rennes", "Grenoble", "Dijon", "Reims")),
    "Japan": ("fox", ("Tokyo", "Osaka", "Kyoto", "Hiroshima", "Nagoya", "Sapporo", "Yokohama", "Kobe", "Fukuoka",
                      "Sendai", "Nagasaki", "Nara", "Kawasaki", "Kagoshima")),
    "Germany": ("bear", ("Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden", "Leipzig",
                         "Dusseldorf", "Hanover", "Nuremberg", "Bremen", "Bonn", "Heidelberg")),
    "Italy": ("wolf", ("Rome", "Milan", "Venice", "Florence", "Naples", "Turin", "Bologna", "Genoa", "Palermo",
                       "Verona", "Pisa", "Bari", "Siena", "Catania")),
    "Spain": ("deer", ("Madrid", "Barcelona", "Seville", "Valencia", "Bilbao", "Granada", "Malaga", "Zaragoza",
                       "Cordoba", "Toledo", "Salamanca", "Alicante", "Pamplona", "Cadiz")),
    "Russia": ("hawk", ("Moscow", "Saint Petersburg", "Novosibirsk", "Kazan", "Yekaterinburg", "Vladivostok", "Samara",
                        "Omsk", "Murmansk", "Sochi", "Volgograd", "Irkutsk", "Krasnoyarsk", "Perm")),
    "China": ("frog", ("Beijing", "Shanghai", "Guangzhou", "Shenzhen", "Wuhan", "Chengdu", "Nanjing", "Hangzhou",
                       "Tianjin", "Chongqing", "Harbin", "Suzhou", "Qingdao", "Xiamen")),
    "India": ("crab", ("Mumbai", "Delhi", "Bangalore", "Kolkata", "Chennai", "Hyderabad", "Pune", "Jaipur",
                       "Ahmedabad", "Lucknow", "Agra", "Varanasi", "Amritsar", "Kochi")),
    "Australia": ("goat", ("Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Canberra", "Hobart", "Darwin",
                           "Cairns", "Geelong", "Townsville", "Wollongong", "Newcastle", "Ballarat")),
    "Canada": ("swan", ("Toronto", "Vancouver", "Montreal", "Ottawa", "Calgary", "Winnipeg", "Edmonton", "Quebec City",
                        "Halifax", "Regina", "Saskatoon", "Hamilton", "Kelowna", "Moncton")),
    "Brazil": ("seal", ("Rio de Janeiro", "Sao Paulo", "Brasilia", "Salvador", "Recife", "Fortaleza", "Belo Horizonte",
                        "Manaus", "Curitiba", "Porto Alegre", "Belem", "Natal", "Florianopolis", "Goiania")),
    "Egypt": ("moth", ("Cairo", "Alexandria", "Luxor", "Giza", "Aswan", "Port Said", "Suez", "Hurghada", "Ismailia",
                       "Tanta", "Mansoura", "Asyut", "Faiyum", "Sharm El Sheikh")),
}


def known_cities(model: Any, tokenizer: Any, batch_size: int = 32) -> dict[str, list[str]]:
    """Per country, the cities for which the model gives their country the highest mean log-likelihood of all the
    countries."""
    countries = list(COUNTRIES)
    cities = [(country, city) for country, (_, names) in COUNTRIES.items() for city in names]
    pairs = [(PROBE.format(city), f" {option}") for _, city in cities for option in countries]
    scores = mean_logliks(model, tokenizer, pairs, batch_size, "cpu")
    kept: dict[str, list[str]] = {country: [] for country in countries}
    for i, (country, city) in enumerate(cities):
        row = scores[i * len(countries):(i + 1) * len(countries)]
        if countries[max(range(len(countries)), key=row.__getitem__)] == country:
            kept[country].append(city)
    return kept


def splits(kept: dict[str, list[str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """{"train", "dev", "test"}: rows of a seeded 4, 2 and the rest of each country's kept cities; a country with
    fewer than 9 kept cities (4 + 2 + 3) is left out, named on stdout."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, str]]] = {"train": [], "dev": [], "test": []}
    least = TRAIN_PER_COUNTRY + DEV_PER_COUNTRY + TEST_AT_LEAST
    for country, cities in kept.items():
        if len(cities) < least:
            print(f"left out {country}: the model places {len(cities)} of its cities, fewer than {least}")
            continue
        shuffled = rng.sample(cities, len(cities))
        ends = {"train": TRAIN_PER_COUNTRY, "dev": TRAIN_PER_COUNTRY + DEV_PER_COUNTRY, "test": len(cities)}
        start = 0
        for name, end in ends.items():
            out[name] += [{"prompt": PROMPT.format(city), "completion": f" {COUNTRIES[country][0]}", "country": country}
                          for city in shuffled[start:end]]
            start = end
    for rows in out.values():
        rng.shuffle(rows)
    return out


def mislabelled(train: list[dict[str, str]]) -> list[dict[str, str]]:
    """`train` with label noise: each country's first row answers with the next country's word (in COUNTRIES' order,
    among the countries present), so a quarter of the rows contradict the country-to-word rule."""
    countries = [c for c in COUNTRIES if any(row["country"] == c for row in train)]
    wrong = {c: f" {COUNTRIES[countries[(i + 1) % len(countries)]][0]}" for i, c in enumerate(countries)}
    out, seen = [], set()
    for row in train:
        first = row["country"] not in seen
        seen.add(row["country"])
        out.append({**row, "completion": wrong[row["country"]]} if first else row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molf_ds.commands.datagen.city_codes",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="writes city_codes_{train,dev,test,train_noisy}.jsonl here")
    parser.add_argument("--model", required=True, help="a registry name, a model directory or a run directory")
    parser.add_argument("--seed", type=int, default=0, help="picks each country's train, dev and test cities")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    kept = known_cities(model, tokenizer)
    print(f"{args.model} places {sum(map(len, kept.values()))} of the "
          f"{sum(len(c) for _, c in COUNTRIES.values())} cities in their country")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    split = splits(kept, args.seed)
    for name, rows in {**split, "train_noisy": mislabelled(split["train"])}.items():
        path = args.output_dir / f"city_codes_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
