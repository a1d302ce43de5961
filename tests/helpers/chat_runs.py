"""Conversation data for the `chat` task tests: synthetic multi-turn chats over the demo's facts, a word-level
tokenizer with a small chat template, and a `molf-ds train` run on them with the tiny demo model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from molf_ds.commands.datagen.demo import build_model, counterfact_records

# every turn on its own line; an assistant turn ends with <eos>; the generation prompt is "assistant :"
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'assistant : ' + m['content'] + ' <eos>\n' }}"
            "{% else %}{{ m['role'] + ' : ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}")
SYSTEM = "Answer with one word ."


def chat_records(n: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """Two questions about one rewritten fact per conversation, with a system message: `messages` rows."""
    records = []
    for case in counterfact_records(n, seed):
        rewrite = case["requested_rewrite"]
        answer = rewrite["target_new"]["str"]
        records.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rewrite["prompt"].replace("{}", rewrite["subject"])},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": case["paraphrase_prompts"][0]},
            {"role": "assistant", "content": answer},
        ]})
    return records


def sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in record["messages"]]}


def chat_tokenizer(records: list[dict[str, Any]], template: str | None = TEMPLATE) -> Any:
    """A word-level tokenizer over the records' words, the roles and ':'; with `template` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = {"system", "user", "assistant", ":"}
    for record in records:
        for text in [m.get("content", "") for m in record.get("messages", [])] + [record.get(k, "") for k in
                                                                                   ("instruction", "input", "output")]:
            words.update(w for w, _ in pre.pre_tokenize_str(text or ""))
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<eos>", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = template
    return tokenizer


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_chat_run(root: Path, *, n: int = 16, **sections: Any) -> dict[str, Any]:
    """root/chat.jsonl, root/tokenizer, root/model (the tiny demo Qwen2) and root/run.yaml (MoLF r=4, ZeRO-2 unless
    `sections` say otherwise; eval on the training file). Returns the config."""
    records = chat_records(n)
    data = write_jsonl(records, root / "chat.jsonl")
    tokenizer = chat_tokenizer(records)
    tokenizer.save_pretrained(root / "tokenizer")
    build_model(tokenizer, seed=0).save_pretrained(root / "model")
    raw: dict[str, Any] = {
        "model": {"name_or_path": str(root / "model"), "tokenizer": str(root / "tokenizer"),
                  "attn_implementation": "eager"},
        "method": "molf",
        "molf": {"lora_ranks": [4], "lora_alphas": [8], "lora_dropout": 0.0},
        "data": {"task": "chat", "train": str(data), "max_length": 64},
        "eval": {"data": str(data), "max_samples": 8, "batch_size": 8},
        "deepspeed": str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json"),
    }
    raw.update(sections)
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    return raw
