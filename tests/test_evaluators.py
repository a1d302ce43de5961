"""The task evaluators on fixture files in each dataset's schema, with hand-computed scores (fake models whose
answers are known), batched greedy decoding against one-at-a-time, `molf-ds eval` on a saved model, ZeRO-3
evaluation with unequal per-rank work (must not hang; the chat task's Likelihood as under ZeRO-2), and the
lora-rest baseline's trainable set."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers.chat_runs import chat_records, chat_tokenizer
from helpers.distributed import spawn
from molf_ds.commands.train.data import TASKS, open_table, rows
from molf_ds.commands.datagen.demo import build_model, build_tokenizer, counterfact_records
from molf_ds.commands.train.evaluate import evaluate, greedy, greedy_batch, normalise_sql, sql_match


def word_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.WhitespaceSplit()  # decode joins words with spaces: `"x"` stays one word
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", *words])},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def load_items(task, path):
    where, table = open_table(str(path), "train")
    return [item for row in rows(where, table, range(len(table))) for item in TASKS[task].evals(row)]


class Unigram(nn.Module):
    """Next-token logits `w` at every position, whatever the prompt: an option's likelihood is known by hand."""

    def __init__(self, tokenizer, weights: dict[str, float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(len(tokenizer)))
        with torch.no_grad():
            for word, value in weights.items():
                self.w[tokenizer.convert_tokens_to_ids(word)] = value
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return type("Out", (), {"logits": self.w.expand(*input_ids.shape, -1)})()


class Canned(nn.Module):
    """`generate` appends a fixed answer to each (left-padded) prompt."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = {tuple(tokenizer(p)["input_ids"]): tokenizer(a, add_special_tokens=False)["input_ids"]
                        for p, a in answers.items()}
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **kwargs):
        self.calls += 1
        outs = [self.answers[tuple(r[m.bool()].tolist())][:max_new_tokens] + [eos_token_id]
                for r, m in zip(input_ids, attention_mask)]
        width = max(map(len, outs))
        tail = torch.tensor([o + [eos_token_id] * (width - len(o)) for o in outs])
        return torch.cat([input_ids, tail], dim=1)


def test_sql_normalisation_by_hand():
    assert normalise_sql("SELECT name FROM users WHERE id = 1;") == normalise_sql("select name\nfrom  users where id=1")
    assert sql_match("SELECT COUNT(*) FROM t AS a", "select count( * ) from t a")  # sqlglot: alias forms
    assert sql_match("SELECT * FROM t WHERE x = 'a'", 'select * from t where x = "a"')  # quote style
    assert sql_match("SELECT x FROM WHERE", "select  x  from where")  # unparseable: textual normalisation only
    assert not sql_match("SELECT name FROM users WHERE id = 1", "SELECT name FROM users WHERE id = 2")
    assert not sql_match("SELECT a FROM t", "SELECT a, b FROM t")


def test_sql_exact_match_on_a_fixture(tmp_path):
    records = [
        {"sql_prompt": "How many ships?", "sql_context": "CREATE TABLE ships (id INT);", "sql": "SELECT COUNT(*) FROM ships;"},
        {"sql_prompt": "Names of crew?", "sql_context": "", "sql": "SELECT name FROM crew AS c"},
        {"sql_prompt": "Oldest port?", "sql_context": "CREATE TABLE ports (age INT);", "sql": "SELECT MAX(age) FROM ports"},
        {"sql_prompt": "Total cargo?", "sql_context": "", "sql": "SELECT SUM(w) FROM cargo WHERE y = 'x'"},
    ]
    path = tmp_path / "sql.jsonl"
    path.write_text("".join(json.dumps({**r, "domain": "d", "sql_complexity": "c", "sql_task_type": "t",
                                        "sql_explanation": "e"}) + "\n" for r in records))
    items = load_items("sql", path)
    generated = ["select count ( * ) from ships", "SELECT name FROM crew c", "SELECT MIN(age) FROM ports",
                 'select sum(w) from cargo where y = "x"']  # hit (case, ;), hit (alias), miss, hit (quotes)
    tokenizer = word_tokenizer([i.prompt for i in items] + generated)
    model = Canned(tokenizer, {i.prompt: g for i, g in zip(items, generated)})
    assert evaluate(model, tokenizer, items, ("exact_match",), 3, 32, "cpu") == {"exact_match": 0.75}
    assert model.calls == 2  # batched: 4 prompts in batches of 3


def test_med_accuracy_by_option_likelihood(tmp_path):
    path = tmp_path / "med.csv"
    header = "id,question,opa,opb,opc,opd,cop,choice_type,exp,subject_name,topic_name\n"
    body = "".join(f"{i},Which organ {i}?,liver,heart,lung,skin,{cop},single,,Anatomy,t\n"
                   for i, cop in enumerate([2, 0, 2, 3, 1]))
    path.write_text(header + body)
    items = load_items("med", path)
    tokenizer = word_tokenizer([i.prompt for i in items] + ["A B C D"])
    model = Unigram(tokenizer, {"A": 1.0, "B": 0.5, "C": 3.0, "D": -1.0})  # always answers C
    assert evaluate(model, tokenizer, items, ("accuracy",), 3, 8, "cpu") == {"accuracy": pytest.approx(2 / 5)}
    assert model.calls == 7  # 20 option scorings in batches of 3


def test_fact_efficacy_paraphrase_neighborhood(tmp_path):
    def case(i, subject, new, true, paraphrases, neighbors):
        return {"case_id": i, "requested_rewrite": {"prompt": "{} is the capital of", "subject": subject,
                                                      "relation_id": "P1", "target_new": {"str": new, "id": "Q1"},
                                                      "target_true": {"str": true, "id": "Q2"}},
                "paraphrase_prompts": paraphrases, "neighborhood_prompts": neighbors, "attribute_prompts": [],
                "generation_prompts": []}

    data = [case(0, "Aland", "Paris", "Rome", ["Aland capital", "Aland has capital"], ["Bland is the capital of"]),
            case(1, "Cland", "Berlin", "Madrid", ["Cland capital"], ["Dland capital", "Eland capital"]),
            case(2, "Fland", "Oslo", "Lima", ["Fland capital"], ["Gland capital"])]
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(data))
    items = load_items("fact", path)
    tokenizer = word_tokenizer([i.prompt for i in items] + ["Paris Rome Berlin Madrid Oslo Lima"])
    model = Unigram(tokenizer, {"Paris": 2, "Rome": 1, "Berlin": 0, "Madrid": 3, "Oslo": 5, "Lima": 4})
    # new beats true in cases 0 and 2: efficacy 2/3; paraphrases 2 + 0 + 1 of 4; neighborhood 0 + 2 + 0 of 4
    scores = evaluate(model, tokenizer, items, TASKS["fact"].metrics, 4, 8, "cpu")
    assert scores == {"efficacy": pytest.approx(2 / 3), "paraphrase": 0.75, "neighborhood": 0.5}


@pytest.fixture(scope="module")
def tiny():
    records = counterfact_records(8)
    tokenizer = build_tokenizer(records)
    return build_model(tokenizer, seed=5).eval(), tokenizer, records


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer, records = tiny
    prompts = [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in records]
    prompts += [p for r in records for p in r["paraphrase_prompts"]][:6]  # different lengths: left padding
    assert greedy_batch(model, tokenizer, prompts, 5, "cpu", 4) == [greedy(model, tokenizer, p, 5, "cpu")
                                                                    for p in prompts]


def test_eval_cli_on_a_saved_model(tiny, tmp_path, capsys):
    from molf_ds.commands.cli import main

    model, tokenizer, records = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(records))
    code = main(["eval", str(tmp_path / "model"), "--task", "fact", "--data", str(path), "--batch-size", "5",
                 "--output", str(tmp_path / "scores.json"), "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    items = load_items("fact", path)
    want = evaluate(model, tokenizer, items, TASKS["fact"].metrics, 7, 8, "cpu")
    assert printed == {**want, "items": len(items), "rows": len(records)}
    assert json.loads((tmp_path / "scores.json").read_text()) == printed
    assert main(["eval", str(tmp_path / "model"), "--task", "fact", "--data", str(tmp_path / "none.json")]) == 2


def _engine(model, stage):
    import deepspeed

    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}  # all partitioned
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "zero_allow_untested_optimizer": True}
    return deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)[0]


def _items():
    """Fact choices and generations, and chat conversations (Likelihood), 5 + 3 + 5: rank 0 scores 3 + 2 + 3 of
    them, rank 1 2 + 1 + 2."""
    from molf_ds.commands.train.data import Generation

    choices = [i for r in counterfact_records(8) for i in TASKS["fact"].evals(_row(r))][:5]
    gens = [Generation("exact_match", c.prompt, "x") for c in choices[:3]]
    chats = [i for r in chat_records(5) for i in TASKS["chat"].evals(_row(r))]
    return choices + gens, chats


FACT_METRICS = ("efficacy", "paraphrase", "neighborhood", "exact_match")


def _zero3_worker(rank, world, out):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = build_tokenizer(counterfact_records(8))
    facts, chats = _items()
    scores = {"fact": evaluate(_engine(build_model(tokenizer, seed=5), 3).module, tokenizer, facts, FACT_METRICS, 2,
                               3, "cpu")}
    tokenizer = chat_tokenizer(chat_records(5))
    for stage in (2, 3):  # the chat task's Likelihood evaluator, on the same model under each
        module = _engine(build_model(tokenizer, seed=5), stage).module
        assert stage == 2 or all(p.numel() == 0 for p in module.parameters())  # ZeRO-3: only partitions held
        scores[f"chat-zero{stage}"] = evaluate(module, tokenizer, chats, TASKS["chat"].metrics, 2, 3, "cpu")
    if rank == 0:
        with open(out, "w") as f:
            json.dump(scores, f)


def _row(record):
    from molf_ds.commands.train.data.base import Row

    return Row("mem", 1, record)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_zero3_evaluation_with_unequal_rank_shares_does_not_hang(tmp_path, tiny):
    """Fact choices and generations, and the chat task's Likelihood, scored under ZeRO-3 on 2 ranks as in one
    process; chat's under ZeRO-3 exactly as under ZeRO-2."""
    model, tokenizer, _ = tiny
    spawn(_zero3_worker, 2, str(tmp_path / "scores.json"))
    got = json.loads((tmp_path / "scores.json").read_text())
    facts, chats = _items()
    assert got["fact"] == pytest.approx(evaluate(model, tokenizer, facts, FACT_METRICS, 2, 3, "cpu"))
    assert got["chat-zero3"] == got["chat-zero2"]
    tokenizer = chat_tokenizer(chat_records(5))
    want = evaluate(build_model(tokenizer, seed=5).eval(), tokenizer, chats, TASKS["chat"].metrics, 2, 3, "cpu")
    assert set(want) == {"token_accuracy", "loss"} and got["chat-zero3"] == pytest.approx(want)


def test_lora_rest_trains_the_parameters_outside_the_wrapped_layers(tiny):
    from peft import LoraConfig, get_peft_model

    from molf_ds.commands.train.methods import rest_groups

    model, tokenizer, _ = tiny
    fresh = build_model(tokenizer, seed=5)
    peft_model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    groups = rest_groups(peft_model, 1e-3, 0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    names = {n: p for n, p in peft_model.named_parameters()}
    assert all(g["lr"] == 1e-3 for g in groups) and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert any("embed_tokens" in n and id(p) in in_groups for n, p in names.items())
    assert any("norm" in n and id(p) in in_groups for n, p in names.items())
    for n, p in names.items():
        wrapped = "q_proj" in n or "v_proj" in n
        assert (id(p) in in_groups) == (not wrapped), n  # wrapped layers (base and LoRA) are not in the rest
        assert p.requires_grad == (not wrapped or "lora_" in n), n
