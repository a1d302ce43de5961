"""The `chat` and `alpaca` tasks: conversations rendered with the chat template and trained on their assistant
turns only (a word-level tokenizer with a template, and SmolLM2's, prepared by a fixture), ShareGPT rows the same as
messages rows, alpaca prompts, malformed rows named by file, row and field, a tokenizer without a chat template,
the teacher-forced evaluation, and a 2-rank `molf-ds train` run on a chat JSONL."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.chat_runs import SYSTEM, chat_records, chat_tokenizer, sharegpt, write_chat_run, write_jsonl
from molf_ds.commands.models import prepare
from molf_ds.commands.sources import SourceError, check_chat_template
from molf_ds.commands.train.config import DataSection, EvalSection
from molf_ds.commands.train.data import IGNORE_INDEX, Conversation, DataError, Example, Likelihood, load_task, tokenize
from molf_ds.commands.train.data.alpaca import WITH_INPUT, WITHOUT_INPUT
from molf_ds.commands.datagen.demo import build_model
from molf_ds.commands.train.evaluate import evaluate


def load(task: str, path: Path, max_length: int = 512, **eval_kw):
    return load_task(DataSection(task=task, train=str(path), max_length=max_length), EvalSection(**eval_kw))


@pytest.fixture(scope="module")
def records():
    return chat_records(4)


@pytest.fixture(scope="module")
def tokenizer(records):
    return chat_tokenizer(records)


def words(text: str) -> list[str]:
    return text.split()  # every word is one token of the word-level tokenizer


def test_chat_labels_are_the_assistant_turns_only(tmp_path, records, tokenizer):
    data = load("chat", write_jsonl(records, tmp_path / "chat.jsonl"))
    first = records[0]["messages"]
    where = f"{tmp_path / 'chat.jsonl'}: row 1"
    assert data.train[0] == Conversation(tuple((m["role"], m["content"]) for m in first), where)
    (feature,), dropped = tokenize(data.train[:1], tokenizer, max_length=512)
    assert dropped == 0
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    answer = first[2]["content"]
    trained = [*words(answer), "<eos>"]
    turns = [(["system", ":", *words(SYSTEM)], False), (["user", ":", *words(first[1]["content"])], False),
             (["assistant", ":"], False), (trained, True), (["user", ":", *words(first[3]["content"])], False),
             (["assistant", ":"], False), (trained, True)]
    assert tokens == [t for turn, _ in turns for t in turn]
    want = [tokenizer.convert_tokens_to_ids(t) if loss else IGNORE_INDEX for turn, loss in turns for t in turn]
    assert feature["labels"] == want
    assert feature["input_ids"] == tokenizer.apply_chat_template(list(first), tokenize=True)["input_ids"]
    # cut inside the second assistant turn: the first stays trained; cut before any: dropped
    cut = len(tokens) - 1
    (short,), _ = tokenize(data.train[:1], tokenizer, max_length=cut)
    assert short["labels"] == want[:cut]
    assert tokenize(data.train[:1], tokenizer, max_length=10) == ([], 1)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted into the molf_ds cache (once; later runs reuse it)."""
    return prepare("smollm2-135m")


@pytest.mark.slow  # converts SmolLM2's GGUF on a clean cache
def test_chat_labels_with_smollm2_template(tmp_path, smollm2):
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    data = load("chat", write_jsonl([{"messages": messages}], tmp_path / "chat.jsonl"))
    (feature,), _ = tokenize(data.train, smol, max_length=512)
    assert feature["input_ids"] == smol.apply_chat_template(messages, tokenize=True)["input_ids"]
    runs, run = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [smol.decode(r) for r in runs] == ["Hello! How can I help?<|im_end|>\n", "4<|im_end|>\n"]


def test_tokenizer_without_offsets_cuts_the_text_at_the_turns(tmp_path, records, tokenizer, monkeypatch):
    data = load("chat", write_jsonl(records, tmp_path / "chat.jsonl"))
    want = tokenize(data.train, tokenizer, 512)
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))  # a slow tokenizer's path
    assert tokenize(data.train, tokenizer, 512) == want


def test_sharegpt_rows_render_as_messages_rows(tmp_path, records, tokenizer):
    messages = load("chat", write_jsonl(records, tmp_path / "messages.jsonl"))
    converted = load("chat", write_jsonl([sharegpt(r) for r in records], tmp_path / "sharegpt.jsonl"))
    assert [c.messages for c in converted.train] == [c.messages for c in messages.train]
    assert tokenize(converted.train, tokenizer, 512) == tokenize(messages.train, tokenizer, 512)


def test_alpaca_prompt_and_output(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue"},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5 "},
            {"instruction": "Say hi.", "output": "hi"}]
    data = load("alpaca", write_jsonl(rows, tmp_path / "alpaca.jsonl"), holdout=1)
    assert data.train == [Example(WITHOUT_INPUT.format(instruction="Name a colour."), "Blue"),
                          Example(WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3"), "5")]
    assert data.train[1].prompt.endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert data.evals == [Likelihood(Example(WITHOUT_INPUT.format(instruction="Say hi."), "hi"), max_length=512)]
    assert data.metrics == ("token_accuracy", "loss")


@pytest.mark.parametrize("task,row,field,problem", [
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1].content",
     "is missing"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
     "messages[1].role", "must be one of system, user, assistant, got 'robot'"),
    ("chat", {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]}, "messages",
     "has no assistant turn"),
    ("chat", {"messages": "hello"}, "messages", "must be a non-empty list of objects"),
    ("chat", {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "conversations[1].from", "must be one of system, human, gpt"),
    ("chat", {"text": "hi"}, "messages", "is missing (or give ShareGPT's 'conversations')"),
    ("alpaca", {"instruction": "Say hi.", "input": ""}, "output", "is missing"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, records, task, row, field, problem):
    good = records[:2] if task == "chat" else [{"instruction": "a", "output": "b"}] * 2
    path = write_jsonl([*good, row], tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as error:
        load(task, path)
    assert str(error.value).startswith(f"{path}: row 3: field '{field}' {problem}")


def test_tokenizer_without_chat_template(tmp_path, records, tokenizer):
    data = load("chat", write_jsonl(records, tmp_path / "chat.jsonl"))
    plain = chat_tokenizer(records, template=None)
    with pytest.raises(DataError, match="has no chat template: set model.tokenizer to one that has"):
        tokenize(data.train, plain, 512)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(SourceError, match=r"config key 'model.tokenizer': data.task is chat but the tokenizer .* has "
                                          r"no chat template: set model.tokenizer=DIR"):
        check_chat_template("model.tokenizer", str(tmp_path / "plain"))
    tokenizer.save_pretrained(tmp_path / "templated")
    check_chat_template("model.tokenizer", str(tmp_path / "templated"))


def test_config_check_names_a_tokenizer_without_chat_template(tmp_path, records):
    from molf_ds.commands.sources import check_config
    from molf_ds.commands.train import from_dict

    raw = write_chat_run(tmp_path, n=4, train={"output_dir": str(tmp_path / "out"), "max_steps": 1})
    chat_tokenizer(records, template=None).save_pretrained(tmp_path / "plain")
    check_config(from_dict(raw))
    with pytest.raises(SourceError, match="config key 'model.tokenizer': data.task is chat but the tokenizer"):
        check_config(from_dict(raw, [f"model.tokenizer={tmp_path / 'plain'}"]))
    check_config(from_dict(raw, [f"model.tokenizer={tmp_path / 'plain'}", "data.task=jsonl"]))


def test_template_that_rewrites_earlier_turns_is_named(tmp_path, records):
    path = write_jsonl(records[:1], tmp_path / "chat.jsonl")
    data = load("chat", path)
    hiding = chat_tokenizer(records, "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
                                     "{{ m['role'] + ' : ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                                     "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}")
    with pytest.raises(DataError, match=f"{path}: row 1: the chat template .* cannot be located"):
        tokenize(data.train, hiding, 512)


def test_evaluation_is_token_accuracy_and_mean_loss(tmp_path, records, tokenizer):
    data = load("chat", write_jsonl(records, tmp_path / "chat.jsonl"), max_length=30, holdout=2)
    assert [item.max_length for item in data.evals] == [30, 30]
    model = build_model(tokenizer, seed=1).eval()
    features, _ = tokenize([item.example for item in data.evals], tokenizer, 30)
    nll = correct = tokens = 0.0
    with torch.no_grad():
        for f in features:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(f["labels"][1:])
            keep = labels != IGNORE_INDEX
            nll += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            correct += (logits[keep].argmax(-1) == labels[keep]).sum().item()
            tokens += keep.sum().item()
    scores = evaluate(model, tokenizer, data.evals, data.metrics, batch_size=3, max_new_tokens=4, device="cpu",
                      progress=False)
    assert scores["token_accuracy"] == pytest.approx(correct / tokens)
    assert scores["loss"] == pytest.approx(nll / tokens, rel=1e-5)


@pytest.mark.slow
def test_two_rank_chat_run(tmp_path):
    """Packed (data.packing): several conversations per sequence, attention kept within each."""
    raw = write_chat_run(tmp_path, train={"output_dir": str(tmp_path / "out"), "max_steps": 3, "micro_batch_size": 2,
                                          "lr": 1e-3, "lora_lr": 1e-3})
    raw["data"]["packing"] = True
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "molf_ds.commands.train", str(tmp_path / "run.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "eval before training (step 0): token_accuracy" in result.stderr
    assert re.search(r"data.packing: 16 rows in \d+ sequences of at most 64 tokens", result.stderr)
    out = Path(raw["train"]["output_dir"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and set(evals[0]) == {"step", "token_accuracy", "loss"}
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert (out / "final" / "model.safetensors").exists()
