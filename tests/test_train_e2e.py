"""`molf-ds train` end to end on the demo task (a tiny generated model): 2 ranks under torchrun with ZeRO-2
writing every documented output; resume=auto after an interrupted run reproduces the uninterrupted run;
every baseline and MoLF-E trains a few steps under ZeRO-2 on 2 ranks."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.demo_runs import ZERO2, jsonl, train_on_two_ranks, write_demo_run
from helpers.distributed import spawn
from molf_ds.commands.train.checkpoints import COMPLETE

pytestmark = pytest.mark.slow  # torchrun and spawned ranks on the demo task

STEPS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-e2e")
    raw = write_demo_run(
        root, lora_dropout=0.1, eval_samples=8, deepspeed=ZERO2,  # dropout: resume must replay it
        train={"output_dir": str(root / "out"), "max_steps": STEPS, "micro_batch_size": 4,
               "gradient_accumulation_steps": 2, "lr": 2e-3, "lora_lr": 2e-3, "scheduler": "constant_with_warmup",
               "warmup_steps": 2, "save_steps": 4},
    )
    return root, raw


@pytest.fixture(scope="module")
def full_run(demo):
    root, _ = demo
    notices = train_on_two_ranks(root, f"train.output_dir={root / 'full'}")
    return root / "full", notices


def test_molf_run_writes_every_output(full_run):
    out, notices = full_run
    assert "eval before training (step 0): efficacy" in notices and f"outputs in {out}/" in notices
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "molf"
    routing = jsonl(out / "routing.jsonl")
    assert [r["step"] for r in routing] == list(range(1, STEPS + 1))
    assert len(routing[0]["modules"]) == 14 and routing[0]["lr_scale"] == 0.0  # 2 layers x 7 projections
    metrics = jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert set(m) == {"step", "epoch", "loss", "lr", "tokens_per_s", "routing", "routing_by_type"}
        assert math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 and set(m["routing"]) == {"full", "lora0"}
        assert sum(m["routing"].values()) == pytest.approx(1.0)
    assert metrics[0]["lr"] == 0.0 and metrics[-1]["lr"] == pytest.approx(2e-3)  # the lr each step used
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert [e["step"] for e in jsonl(out / "eval.jsonl")] == [0, STEPS]
    assert set(jsonl(out / "eval.jsonl")[0]) == {"step", "efficacy", "paraphrase", "neighborhood"}
    for step in (4, 8):
        assert json.loads((out / "checkpoints" / f"step{step}" / COMPLETE).read_text()) == {"step": step}
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # a vanilla checkpoint: no expert left
    assert not any("lora" in name or "base_layer" in name for name in model.state_dict())
    assert AutoTokenizer.from_pretrained(out / "final").eos_token == "<eos>"
    assert not (out / "final_peft").exists()
    png = (out / "routing.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_resume_auto_reproduces_the_uninterrupted_run(demo, full_run):
    root, _ = demo
    full, _ = full_run
    out = root / "resumed"
    train_on_two_ranks(root, f"train.output_dir={out}", f"train.max_steps={STEPS // 2}")
    (out / "checkpoints" / "step6").mkdir()  # a checkpoint whose writing was interrupted: no marker
    (out / "checkpoints" / "step6" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    with open(out / "metrics.jsonl", "a") as file:  # a step logged after the last checkpoint
        file.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")
    notices = train_on_two_ranks(root, f"train.output_dir={out}", "train.resume=auto")
    assert f"resumed from {out / 'checkpoints' / 'step4'} at step 4" in notices
    assert jsonl(out / "routing.jsonl") == jsonl(full / "routing.jsonl")  # winners and scores, every step
    keep = ("step", "epoch", "loss", "lr", "routing")
    assert [{k: m[k] for k in keep} for m in jsonl(out / "metrics.jsonl")] == \
        [{k: m[k] for k in keep} for m in jsonl(full / "metrics.jsonl")]
    assert jsonl(out / "eval.jsonl")[-1] == jsonl(full / "eval.jsonl")[-1]
    want, have = load_file(full / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=0, atol=0, msg=name)


def _methods_worker(rank: int, world: int, runs: list[dict]) -> None:
    from molf_ds.commands.train import from_dict, run

    for raw in runs:
        run(from_dict(raw))


@pytest.mark.parametrize("methods", [("fft", "lora", "adalora", "molf-e")])
def test_every_method_trains_under_zero2(demo, methods):
    root, base = demo
    runs = []
    for method in methods:
        raw = json.loads(json.dumps(base))
        raw["method"] = method
        raw["molf"] = {"lora_ranks": [4, 8], "lora_alphas": [8, 8]} if method == "molf-e" else None
        raw["lora"] = {"r": 4, "alpha": 8, "init_r": 6, "target_r": 4, "tinit": 1, "tfinal": 1}
        raw["eval"] = {}
        raw["train"].update(output_dir=str(root / method), max_steps=3, save_steps=0, lr=1e-3, lora_lr=1e-3)
        runs.append(raw)
    spawn(_methods_worker, 2, runs)
    initial = load_file(root / "demo" / "model" / "model.safetensors")
    for method in methods:
        out = root / method
        metrics = jsonl(out / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
        assert ("routing" in metrics[0]) == (method == "molf-e")
        final = load_file(out / "final" / "model.safetensors")
        assert set(initial) <= set(final), method  # merged back into the vanilla architecture
        assert not any("lora" in k or "base_layer" in k for k in final), method
        assert any(not torch.equal(final[k], initial[k]) for k in initial), f"{method} did not train"
        assert (out / "final_peft" / "adapter_config.json").exists() == (method != "fft")
        assert (out / "routing.png").exists() == (method == "molf-e")
