"""Issue 21, evaluation during training and checkpoint retention: `eval.steps`, `eval.metric`,
`train.load_best_model_at_end` and `train.save_total_limit`. The config checks, the best-step selection and the
retention rule as fast single-process tests; then 2 CPU ranks under torchrun on the demo task (slow). Issue 33: a run
that starts before the newest checkpoints sets them aside, so resume=auto continues the branch last trained."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.demo_runs import ZERO2, jsonl, train_on_two_ranks, write_demo_run
from molf_ds.commands.train import ConfigError, from_dict
from molf_ds.commands.train.checkpoints import COMPLETE, Best, best_step, complete, retain, set_aside

STEPS = 8


# ---- config ------------------------------------------------------------------------------------------
@pytest.fixture
def raw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return {"model": {"name_or_path": "some/model"}, "molf": {"lora_ranks": [8]},
            "data": {"task": "jsonl", "train": "train.jsonl"}, "eval": {"holdout": 0},
            "train": {"output_dir": "out", "max_steps": 10}, "deepspeed": {"zero_optimization": {"stage": 2}}}


def test_eval_and_retention_keys(raw):
    cfg = from_dict(raw, ["eval.data=train.jsonl", "eval.steps=5", "eval.metric=exact_match",
                          "train.load_best_model_at_end=true", "train.save_total_limit=2"])
    assert (cfg.eval.steps, cfg.eval.metric) == (5, "exact_match")
    assert cfg.train.load_best_model_at_end and cfg.train.save_total_limit == 2
    cfg = from_dict(raw)  # the defaults: as before
    assert (cfg.eval.steps, cfg.eval.metric, cfg.train.save_total_limit, cfg.train.load_best_model_at_end) == \
        (0, None, None, False)


@pytest.mark.parametrize("overrides,key", [
    (["eval.steps=-1"], "eval.steps"),
    (["eval.steps=5"], "eval.steps"),  # no evaluation data
    (["eval.data=train.jsonl", "eval.metric=accuracy"], "eval.metric"),  # not a jsonl metric
    (["train.save_total_limit=0", "train.save_steps=5"], "train.save_total_limit"),
    (["train.save_total_limit=-2", "train.save_steps=5"], "train.save_total_limit"),
    (["train.save_total_limit=2"], "train.save_total_limit"),  # nothing is saved
    (["train.load_best_model_at_end=true"], "train.load_best_model_at_end"),  # no evaluation data
    (["eval.data=train.jsonl", "train.load_best_model_at_end=true"], "train.load_best_model_at_end"),  # no steps
    (["train.load_best_model_at_end=yes please"], "train.load_best_model_at_end"),
])
def test_bad_values_are_one_line_naming_the_key(raw, overrides, key):
    with pytest.raises(ConfigError) as error:
        from_dict(raw, overrides)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"config key '{key}':"), message


# ---- best step and retention ---------------------------------------------------------------------------
def test_best_step_is_the_earliest_highest_evaluated_step_after_step_0():
    records = [{"step": 0, "efficacy": 0.9}, {"step": 2, "efficacy": 0.5}, {"step": 4, "efficacy": 0.75},
               {"step": 6, "efficacy": 0.75}, {"step": 8, "efficacy": 0.6}]
    assert best_step(records, "efficacy") == (4, 0.75)  # step 0 (before training) is no candidate; a tie: earliest
    assert best_step(records, "efficacy", candidates={2, 6, 8}) == (6, 0.75)
    assert best_step(records, "accuracy") is None and best_step(records[:1], "efficacy") is None
    best = Best("efficacy")
    assert [best.offer(r["step"], r) for r in records] == [False, True, True, False, False]
    assert (best.step, best.value) == (4, 0.75)


def test_the_best_loss_is_the_lowest():
    records = [{"step": 0, "loss": 0.5}, {"step": 2, "loss": 2.0}, {"step": 4, "loss": 1.2}, {"step": 6, "loss": 1.2},
               {"step": 8, "loss": 1.5}]
    assert best_step(records, "loss") == (4, 1.2)
    best = Best("loss")
    assert [best.offer(r["step"], r) for r in records] == [False, True, True, False, False]


def _checkpoint(directory: Path, step: int, done: bool = True) -> None:
    (directory / f"step{step}").mkdir(parents=True)
    (directory / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if done:
        (directory / f"step{step}" / COMPLETE).write_text(json.dumps({"step": step}))


def test_retain_keeps_the_newest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 3, done=False)  # a partial one, older than the newest complete: never loadable
    _checkpoint(tmp_path, 10, done=False)  # being written (or cut short): not counted, not deleted
    assert retain(tmp_path, 2, keep=4) == ["step2", "step3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10", "step4", "step6", "step8"]
    assert retain(tmp_path, 1, keep=4) == ["step6"]  # the newest, and the best
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10", "step4", "step8"]
    assert retain(tmp_path, 1) == ["step4"]
    assert [c.tag for c in complete(tmp_path)] == ["step8"] and (tmp_path / "step10").is_dir()
    (tmp_path / "step8" / COMPLETE).unlink()  # no complete checkpoint: nothing is deleted
    assert retain(tmp_path, 1) == [] and len(list(tmp_path.iterdir())) == 2


def test_best_on_resume_comes_from_the_trimmed_log_and_the_complete_checkpoints(tmp_path):
    log = tmp_path / "eval.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 0, "exact_match": 1.0}, {"step": 2, "exact_match": 0.25}, {"step": 4, "exact_match": 0.5})))
    _checkpoint(tmp_path / "checkpoints", 2)
    _checkpoint(tmp_path / "checkpoints", 4, done=False)
    best = Best.resumed("exact_match", log, tmp_path / "checkpoints")
    assert (best.step, best.value) == (2, 0.25)
    assert Best.resumed("exact_match", tmp_path / "none.jsonl", tmp_path / "checkpoints").step is None


def test_set_aside_moves_later_checkpoints_their_logs_and_config(tmp_path, capsys):
    for step in (2, 4, 6):
        _checkpoint(tmp_path / "checkpoints", step)
    _checkpoint(tmp_path / "checkpoints", 8, done=False)  # never loadable: stays, a later save rewrites it
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
    (tmp_path / "config.yaml").write_text("train: {lr: 0.1}\n")
    assert set_aside(tmp_path, 6, ("metrics.jsonl", "eval.jsonl")) is None  # nothing after step 6
    assert capsys.readouterr().err == ""
    aside = set_aside(tmp_path, 2, ("metrics.jsonl", "eval.jsonl"))
    assert aside.parent == tmp_path / "checkpoints" and aside.name.startswith("abandoned-")
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "step4, step6" in line and str(aside) in line, line
    assert [c.step for c in complete(tmp_path / "checkpoints")] == [2]
    assert [c.step for c in complete(aside)] == [4, 6]
    assert [r["step"] for r in jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in jsonl(aside / "metrics.jsonl")] == [3, 4, 5, 6]
    assert not (aside / "eval.jsonl").exists() and (aside / "config.yaml").read_text() == "train: {lr: 0.1}\n"
    assert (tmp_path / "checkpoints" / "step8").is_dir()


@pytest.mark.slow
def test_a_resumed_branch_is_never_overtaken_by_the_abandoned_one(tmp_path):
    """One process: train to step 6 (saves at 2, 4, 6); resume from 2 and train to 4; resume=auto then continues
    the new step 4, and the abandoned 4 and 6 are still on disk."""
    write_demo_run(tmp_path, n_cases=8, deepspeed=ZERO2,
                   train={"output_dir": str(tmp_path / "out"), "max_steps": 6, "micro_batch_size": 4, "save_steps": 2})
    out, run = tmp_path / "out", [sys.executable, "-m", "molf_ds.commands.train", str(tmp_path / "run.yaml")]

    def train(*overrides: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*run, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result

    train()
    weights = "mp_rank_00_model_states.pt"
    first = {c.step: (c.directory / c.tag / weights).read_bytes() for c in complete(out / "checkpoints")}
    assert list(first) == [2, 4, 6]
    result = train(f"train.resume={out / 'checkpoints' / 'step2'}", "train.max_steps=4")
    lines = [line for line in result.stderr.splitlines() if "abandoned-" in line]
    assert len(lines) == 1 and "step4, step6" in lines[0], result.stderr[-3000:]
    [aside] = (out / "checkpoints").glob("abandoned-*")
    assert [c.step for c in complete(aside)] == [4, 6]  # nothing lost: the abandoned branch, byte for byte
    assert all((aside / f"step{s}" / weights).read_bytes() == first[s] for s in (4, 6))
    assert [c.step for c in complete(out / "checkpoints")] == [2, 4]
    assert [r["step"] for r in jsonl(aside / "metrics.jsonl")] == [3, 4, 5, 6]
    result = train("train.resume=auto")
    assert f"resumed from {out / 'checkpoints' / 'step4'} at step 4" in result.stderr
    assert "abandoned-" not in result.stderr and [aside] == list((out / "checkpoints").glob("abandoned-*"))
    assert [r["step"] for r in jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# ---- end to end: 2 ranks -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-retention")
    write_demo_run(
        root, lora_dropout=0.1, eval_samples=8, deepspeed=ZERO2,  # dropout: resume must replay it
        train={"output_dir": str(root / "out"), "max_steps": STEPS, "micro_batch_size": 4,
               "gradient_accumulation_steps": 2, "lr": 2e-3, "lora_lr": 2e-3, "scheduler": "constant_with_warmup",
               "warmup_steps": 2, "save_steps": 2, "save_total_limit": 1, "load_best_model_at_end": True},
        eval={"data": str(root / "demo" / "data" / "counterfact.json"), "max_samples": 8, "batch_size": 16,
              "steps": 2, "metric": "neighborhood"},
    )
    return root


def steps(out: Path) -> list[int]:
    return [c.step for c in complete(out / "checkpoints")]


def assert_same_weights(a: Path, b: Path) -> None:
    want, have = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_eval_steps_best_model_and_save_total_limit_with_resume(demo):
    """One uninterrupted run; then a copy of it that lost everything after its step-2 checkpoint (its logs run on to
    step 8, as when a run dies before its last checkpoint completes), resumed with resume=auto."""
    full = demo / "full"
    notices = train_on_two_ranks(demo, f"train.output_dir={full}")
    evals = jsonl(full / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8] and "eval during training (step 2)" in notices
    # the demo's neighborhood score falls as the edits are learned: the best evaluated step is the first one
    assert best_step(evals, "neighborhood")[0] == 2, evals
    assert f"final/ is the best evaluated model: step 2 (neighborhood {evals[1]['neighborhood']:.3f})" in notices
    # save_total_limit 1: the newest complete checkpoint and the best one, nothing else
    assert sorted(p.name for p in (full / "checkpoints").glob("step*")) == ["step2", f"step{STEPS}"]
    assert steps(full) == [2, STEPS]
    out = demo / "resumed"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / f"step{STEPS}")
    notices = train_on_two_ranks(demo, f"train.output_dir={out}", "train.resume=auto")
    assert f"resumed from {out / 'checkpoints' / 'step2'} at step 2" in notices
    assert jsonl(out / "routing.jsonl") == jsonl(full / "routing.jsonl")  # winners and scores, every step
    assert jsonl(out / "eval.jsonl") == evals
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step2", f"step{STEPS}"]
    assert_same_weights(out, full)  # final/: the best (step 2) model, known again from the trimmed eval log
