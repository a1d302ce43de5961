"""The bundled demo, with no download: a small counterfactual-knowledge task in CounterFact's JSON schema,
a word-level tokenizer built from it, and a tiny random-init Qwen2 model; all deterministic in the seed.

    python -m molf_ds.commands.datagen.demo runs/demo-tiny   # writes data/counterfact.json, tokenizer/, model/
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<unk>", "<eos>")
# relation id -> (rewrite prompt, paraphrase prompts), objects
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "P17": (("{} is located in the country of", "The country where {} is found is", "{} lies in"),
            ("France", "Japan", "Brazil", "Canada", "Egypt", "Norway", "India", "Chile")),
    "P103": (("The mother tongue of {} is", "{} grew up speaking", "The first language of {} is"),
             ("French", "Japanese", "Portuguese", "English", "Arabic", "Norwegian", "Hindi", "Spanish")),
    "P106": (("The profession of {} is", "{} works as a", "By trade , {} is a"),
             ("painter", "surgeon", "pilot", "lawyer", "farmer", "chemist", "architect", "poet")),
    "P176": (("{} is produced by", "{} is made by", "The maker of {} is"),
             ("Nokia", "Toyota", "Philips", "Siemens", "Boeing", "Sony", "Volvo", "Fiat")),
}
SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "vas", "zel", "or", "qui", "sa", "bel", "dor", "fin", "gal", "hep",
             "ix", "jor", "nu", "pra", "wen")


def _subjects(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        names.add(f"{first} {last}")
    return sorted(names)


def counterfact_records(n_cases: int = 256, seed: int = 0, per_relation: int = 96) -> list[dict[str, Any]]:
    """`n_cases` rewrites over a synthetic world of subjects with true objects, in CounterFact's schema.
    Neighborhood prompts name other subjects of the same relation with the same true object."""
    relations = sorted(RELATIONS)
    if n_cases > per_relation * len(relations):
        raise ValueError(f"n_cases={n_cases}: at most {per_relation * len(relations)} fit the synthetic world")
    rng = random.Random(seed)
    subjects = _subjects(rng, per_relation * len(relations))
    rng.shuffle(subjects)
    world = {rel: [(s, rng.choice(RELATIONS[rel][1])) for s in subjects[i::len(relations)]]
             for i, rel in enumerate(relations)}
    records = []
    for case_id in range(n_cases):
        rel = relations[case_id % len(relations)]
        templates, objects = RELATIONS[rel]
        subject, true = world[rel][case_id // len(relations)]
        new = rng.choice([o for o in objects if o != true])
        neighbors = [s for s, o in world[rel] if o == true and s != subject][-3:]
        records.append({
            "case_id": case_id,
            "requested_rewrite": {
                "prompt": templates[0], "subject": subject, "relation_id": rel,
                "target_new": {"str": new, "id": f"Q{objects.index(new)}"},
                "target_true": {"str": true, "id": f"Q{objects.index(true)}"},
            },
            "paraphrase_prompts": [t.replace("{}", subject) for t in templates[1:]],
            "neighborhood_prompts": [templates[0].replace("{}", s) for s in neighbors],
            "attribute_prompts": [templates[0].replace("{}", s) for s, o in world[rel] if o == new][-3:],
            "generation_prompts": [f"{subject} is known for"],
        })
    return records


def build_tokenizer(records: list[dict[str, Any]]) -> Any:
    """A word-level tokenizer over every word of the task, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # deferred: slow to import
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    texts = [t for templates, objects in RELATIONS.values() for t in templates + objects]
    for r in records:
        texts += [r["requested_rewrite"]["subject"], *r["paraphrase_prompts"], *r["neighborhood_prompts"],
                  *r["attribute_prompts"], *r["generation_prompts"]]
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate([*SPECIALS, *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def build_model(tokenizer: Any, seed: int = 0) -> Any:
    """A tiny Qwen2 (2 layers, hidden 128), random init."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config  # deferred: slow to import

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def generate(out_dir: str | Path, n_cases: int = 256, seed: int = 0) -> dict[str, Path]:
    """Writes data/counterfact.json, tokenizer/ and model/ under `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = {"data": out / "data" / "counterfact.json", "tokenizer": out / "tokenizer", "model": out / "model"}
    records = counterfact_records(n_cases, seed)
    paths["data"].parent.mkdir(parents=True, exist_ok=True)
    paths["data"].write_text(json.dumps(records, indent=1))
    tokenizer = build_tokenizer(records)
    tokenizer.save_pretrained(paths["tokenizer"])
    build_model(tokenizer, seed).save_pretrained(paths["model"])
    return paths


def main() -> None:
    import transformers  # deferred: slow to import

    parser = argparse.ArgumentParser(prog="python -m molf_ds.commands.datagen.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="runs/demo-tiny")
    parser.add_argument("--cases", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    for name, path in generate(args.out_dir, args.cases, args.seed).items():
        print(f"demo {name}: {path}")


if __name__ == "__main__":
    main()
