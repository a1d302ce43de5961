"""`molf-ds compare`: the report's arithmetic on hand-made runs (mean/std, MoLF's gap, degenerate routing); the LoRA
baselines' defaults (MoLF's own expert unless lora.* says otherwise); and end to end on the demo task with 2 methods
x 1 seed and a few steps under torchrun (2 ranks): the table, the CSV and the plots are written and their numbers are
the runs' own, the lora run is MoLF's expert, and --reuse keeps a run only while its config and data are unchanged."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from helpers.demo_runs import ZERO2, write_demo_run
from molf_ds.commands.compare import RunResult, gap_percent, method_overrides, summarise, write_report
from molf_ds.commands.train.config import load_config



def test_overrides_may_follow_the_options():
    """`molf-ds compare run.yaml --methods fft train.lr=1e-4` (and generate's prompts after its options) parse as the
    same command with every positional in order; an unknown option is still an error."""
    from molf_ds.commands.cli import parse, parser

    args = parse(parser(), ["compare", "run.yaml", "a=1", "--methods", "fft,lora", "b=2", "--seeds", "3"])
    assert (args.config, args.overrides, args.methods, args.seeds) == ("run.yaml", ["a=1", "b=2"], "fft,lora", 3)
    assert parse(parser(), ["generate", "out", "hi", "--max-new-tokens", "3", "there"]).prompts == ["hi", "there"]
    assert parse(parser(), ["train", "run.yaml", "--local_rank=0", "x=1"]).overrides == ["x=1"]
    for wrong in (["compare", "run.yaml", "--no-such-option"], ["models", "list", "extra"]):
        with pytest.raises(SystemExit):
            parse(parser(), wrong)


def test_report_arithmetic(tmp_path):
    def result(method, seed, efficacy, routing=None):
        r = RunResult(method, seed, tmp_path / f"{method}{seed}", scores={"efficacy": efficacy},
                      losses=[(1, 2.0), (2, 1.0)])
        if routing:
            r.routing = routing
            r.routing_curve = [(1, routing), (2, routing)]
        return r

    results = [result("fft", 0, 0.6), result("fft", 1, 0.8), result("lora", 0, 0.5), result("lora", 1, 0.7),
               result("molf", 0, 0.69, {"full": 0.5, "lora0": 0.5}),
               result("molf", 1, 0.69, {"full": 0.995, "lora0": 0.005})]
    table = summarise(results, ["efficacy"])
    assert table["fft"]["efficacy"] == pytest.approx((0.7, 0.1414213, 2))
    assert table["molf"]["final_loss"][0] == 1.5
    assert gap_percent(table, "molf", "efficacy") == pytest.approx(100 * (0.69 - 0.7) / 0.7)
    assert gap_percent(table, "fft", "efficacy") == 0.0 and gap_percent(table, "molf-e", "efficacy") is None
    write_report(results, tmp_path, ["efficacy"], "efficacy", "molf-ds compare x.yaml")
    md = (tmp_path / "comparison.md").read_text()
    assert "- molf: -1.43% (within 1.5% or better)" in md
    assert md.count("**degenerate routing**") == 1 and "| molf seed 1 | 0.6900 | full 99.5%, lora0 0.5% |" in md
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [r["degenerate_routing"] for r in rows] == ["", "", "", "", "false", "true"]


def test_loss_is_lower_better_in_the_gap_and_the_molf_e_verdict(tmp_path):
    def result(method, loss):
        return RunResult(method, 0, tmp_path / method, scores={"token_accuracy": 0.5, "loss": loss})

    results = [result("fft", 2.0), result("lora", 2.5), result("molf", 1.9), result("adalora", 2.2),
               result("molf-e", 2.4)]
    table = summarise(results, ["token_accuracy", "loss"])
    assert gap_percent(table, "molf", "loss") == pytest.approx(5.0)  # 1.9 against fft's 2.0: 5% better
    assert gap_percent(table, "molf-e", "loss") == pytest.approx(-20.0)
    write_report(results, tmp_path, ["token_accuracy", "loss"], "loss", "molf-ds compare x.yaml")
    md = (tmp_path / "comparison.md").read_text()
    assert "- molf: +5.00% (within 1.5% or better)" in md and "- molf-e: -20.00% (more than 1.5% worse)" in md
    assert "- molf-e - adalora: +0.2000 (not better than AdaLoRA)" in md


def test_lora_baselines_take_molfs_expert_unless_lora_is_set(tmp_path):
    write_demo_run(tmp_path, deepspeed=ZERO2, train={"output_dir": str(tmp_path / "o"), "max_steps": 3},
                   lora={"dropout": 0.2})  # the demo YAML: molf.lora_ranks [4], lora_alphas [8], lora_dropout 0
    config = str(tmp_path / "run.yaml")

    def resolved(methods, *sets):
        per_method = {m: [] for m in methods}
        for item in sets:
            method, _, override = item.partition(":")
            per_method[method].append(override)
        own, line = method_overrides(config, [], per_method, tmp_path / "cmp")
        return {m: load_config(config, [f"method={m}", "molf=null", *own[m]]).lora for m in methods
                if m in ("lora", "lora-rest")}, line

    lora, line = resolved(["fft", "lora", "lora-rest", "molf"], "lora-rest:lora.r=8")
    assert (lora["lora"].r, lora["lora"].alpha, lora["lora"].use_rslora) == (4, 8.0, True)  # rsLoRA: MoLF's default
    assert lora["lora"].dropout == 0.2 and lora["lora-rest"].dropout == 0.2  # the YAML's lora.dropout wins
    assert (lora["lora-rest"].r, lora["lora-rest"].alpha) == (8, 8.0)  # --set wins
    assert lora["lora"].target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert line.startswith("baselines: lora takes molf's LoRA expert where lora.* is unset: r=4 (molf.lora_ranks[0]), "
                           "alpha=8 (molf.lora_alphas[0]), use_rslora=true (MoLF's default use_rslora), "
                           "dropout=0.2 (lora.dropout), ") and "lora-rest takes molf's LoRA expert" in line
    assert "r=8 (lora.r)" in line and "\n" not in line and "adalora" not in line

    lora, line = resolved(["lora", "molf-e", "adalora"], "molf-e:molf.lora_ranks=[4,8]",
                          "molf-e:molf.lora_alphas=[16,16]")  # MoLF-E alone: one LoRA of its total rank
    assert (lora["lora"].r, lora["lora"].alpha) == (12, 16.0)
    assert "r=12 (sum of molf-e's molf.lora_ranks)" in line
    assert line.endswith("; adalora takes lora.* (set or default): init_r=12, target_r=8, alpha=32, dropout=0.2")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from molf_ds.commands.cli import main

    root = tmp_path_factory.mktemp("compare")
    write_demo_run(root, eval_samples=8, deepspeed=ZERO2,
                   train={"output_dir": str(root / "unused"), "max_steps": 3, "micro_batch_size": 4, "lr": 2e-3,
                          "lora_lr": 2e-3, "scheduler": "constant"})
    args = ["compare", str(root / "run.yaml"), "eval.max_samples=6", "--methods", "lora,molf", "--seeds", "1",
            "--output-dir", str(root / "cmp")]
    code = main(args)
    return root / "cmp", code, args


@pytest.mark.slow
def test_compare_end_to_end(compared):
    out, code, _ = compared
    assert code == 0, (out / "logs").iterdir() and [p.read_text()[-3000:] for p in (out / "logs").iterdir()]
    for name in ("comparison.md", "comparison.csv", "metric_per_method.png", "loss_curves.png",
                 "routing_full_share.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert list(rows[0]) == ["method", "seed", "status", "efficacy", "paraphrase", "neighborhood", "efficacy_before",
                             "paraphrase_before", "neighborhood_before", "final_loss", "steps", "wall_s", "share_full",
                             "share_lora0", "degenerate_routing", "ranks", "alphas", "scaling", "rslora", "dropout",
                             "trainable_params", "lr", "lora_lr", "output_dir"]
    assert [(r["method"], r["seed"], r["status"], r["steps"]) for r in rows] == [("lora", "0", "ok", "3"),
                                                                                 ("molf", "0", "ok", "3")]
    for r in rows:  # the numbers are the runs' own evaluations and metrics
        run = Path(r["output_dir"])
        final = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
        assert final["step"] == 3 and float(r["efficacy"]) == final["efficacy"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert float(r["final_loss"]) == pytest.approx(sum(m["loss"] for m in metrics) / 3)
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["method"] == r["method"] and config["eval"]["max_samples"] == 6
    molf = rows[1]
    metrics = [json.loads(line) for line in (Path(molf["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert float(molf["share_full"]) == pytest.approx(sum(m["routing"]["full"] for m in metrics) / 3)
    assert rows[0]["share_full"] == "" and molf["degenerate_routing"] in ("true", "false")
    md = (out / "comparison.md").read_text()
    assert "| lora | 1 |" in md and "| molf | 1 |" in md and "## Routing per MoLF / MoLF-E run" in md
    assert re.search(r"^- molf: [+-]\d+\.\d\d% \(", md, re.M)  # against lora (no fft here)

    # the YAML sets only molf.*: the lora run is MoLF's LoRA expert (r 4, alpha 8, rsLoRA: 8 / sqrt(4) = 4)
    from safetensors import safe_open

    peft_dir = Path(rows[0]["output_dir"]) / "final_peft"
    adapter = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_rslora"], adapter["lora_dropout"]) == (4, 8, True, 0.0)
    with safe_open(peft_dir / "adapter_model.safetensors", "pt") as weights:
        trained = sum(weights.get_slice(name).get_shape()[0] * weights.get_slice(name).get_shape()[1]
                      for name in weights.keys())
    assert [(r["ranks"], r["alphas"], r["rslora"], r["scaling"], r["dropout"], r["lr"], r["lora_lr"]) for r in rows] \
        == [("4", "8", "true", "4", "0", "", "0.002"), ("4", "8", "true", "4", "0", "0.002", "0.002")]
    assert int(rows[0]["trainable_params"]) == trained  # the count is the adapter the run saved
    assert f"| lora | 4 | 8 | true | 4 | 0 | {trained:,} |  | 0.002 |" in md
    assert f"| molf | 4 | 8 | true | 4 | 0 | {int(rows[1]['trainable_params']):,} | 0.002 | 0.002 |" in md


@pytest.mark.slow
def test_reuse_reports_the_runs_wall_time_and_command(compared, capsys):
    from molf_ds.commands.cli import main

    out, _, args = compared
    first = list(csv.DictReader(open(out / "comparison.csv")))
    capsys.readouterr()
    assert main([*args, "--reuse"]) == 0  # nothing trains: every run has its final evaluation, config and data
    printed = capsys.readouterr()
    assert "[1/2] lora seed 0: reusing" in printed.err and "[2/2] molf seed 0: reusing" in printed.err
    assert "not reusing" not in printed.err
    again = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["wall_s"] for r in again] == [r["wall_s"] for r in first] and float(first[0]["wall_s"]) > 0
    record = json.loads((Path(first[1]["output_dir"]) / "compare_run.json").read_text())
    assert "method=molf" in record["command"] and record["command"][-1] == f"train.output_dir={first[1]['output_dir']}"
    assert set(record["data_sha256"]) == {"data.train", "eval.data"}


@pytest.mark.slow
@pytest.mark.parametrize("change", ["lr", "data"])
def test_reuse_reruns_a_run_whose_lr_or_data_changed(compared, tmp_path, capsys, change):
    """On a copy of the compared runs (their config.yaml names the first output directory: that is not compared),
    --reuse again with lora's lr changed, or with the content of the training and evaluation file changed under the
    same path (the same facts in another order). The cells that changed rerun, each saying why in one line; the
    stale run is set aside under stale/, not deleted. The launcher `false` stands for training: what is tested is
    which cells start and why."""
    import shutil

    from molf_ds.commands.cli import main

    out, _, args = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    saved = yaml.safe_load((copy / "runs" / "molf-seed0" / "config.yaml").read_text())
    del saved["eval"]["steps"]  # as written before eval.steps existed: read at its default, 0
    (copy / "runs" / "molf-seed0" / "config.yaml").write_text(yaml.safe_dump(saved))
    data = Path(yaml.safe_load(Path(args[1]).read_text())["data"]["train"])
    original = data.read_text()
    extra = ["--set", "lora:train.lora_lr=0.001"] if change == "lr" else []
    try:
        if change == "data":
            facts = json.loads(original)
            data.write_text(json.dumps(facts[1:] + facts[:1]))
        capsys.readouterr()
        assert main([*args[:-1], str(copy), "--reuse", "--launcher", "false", *extra]) == 1  # `false` fails
    finally:
        data.write_text(original)
    printed = capsys.readouterr()
    why = [line for line in printed.err.splitlines() if "not reusing" in line]
    reran = ["lora"] if change == "lr" else ["lora", "molf"]
    assert len(why) == len(reran)
    for line, method in zip(why, reran):
        run_dir = copy / "runs" / f"{method}-seed0"
        reason = "train.lora_lr 0.002 -> 0.001" if change == "lr" else \
            "data.train content changed, eval.data content changed"
        assert line.startswith(f"[{['lora', 'molf'].index(method) + 1}/2] {method} seed 0: not reusing {run_dir}: "
                               f"{reason} (moved to {copy / 'stale' / method}-seed0-")
        assert f"{method} seed 0: false {args[1]}" in printed.err  # relaunched
    assert ("[2/2] molf seed 0: reusing" in printed.err) == (change == "lr")
    if change == "lr":
        assert "train.lora_lr=0.001" in [line for line in printed.err.splitlines() if "lora seed 0: false" in line][0]
    stale = sorted((copy / "stale").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in stale] == [f"{m}-seed0" for m in reran]
    assert all((p / "eval.jsonl").is_file() for p in stale)


def test_train_routing_summary_warns_when_one_expert_took_every_decision(tmp_path):
    """`molf-ds train`'s closing routing line (the same threshold as compare's degenerate flag)."""
    from molf_ds.commands.train.outputs import routing_summary

    def summary(full_share, lora_share=None):
        path = tmp_path / "metrics.jsonl"
        shares = {"full": full_share, "lora0": 1 - full_share if lora_share is None else lora_share}
        path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "routing": shares,
                                            "routing_by_type": {"q_proj": {"full": full_share}}}) + "\n"
                                for s in (1, 2)))
        return routing_summary(path)

    balanced, degenerate = summary(0.4), summary(0.0)
    assert "warning" not in summary(1.0, 1.0)  # top_k=2 of 2 experts: both win every decision
    assert balanced == "routing over 2 steps: full 40%, lora0 60%; share of 'full' per projection type: q_proj 40%"
    first, warning = degenerate.split("\n")
    assert first.startswith("routing over 2 steps: full 0%, lora0 100%")
    assert warning.startswith("warning: 'lora0' took more than 99% of the routing decisions")
    assert "train.lora_lr" in warning
