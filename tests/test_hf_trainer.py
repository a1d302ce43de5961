"""HF Trainer users: MoLFTrainer with TrainingArguments(deepspeed=...) on 2 CPU ranks, ZeRO-2 and ZeRO-3,
"auto" values in the config, writes the same routing log as the single-process reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.distributed import spawn
from helpers.tiny_models import token_batches
from helpers.zero_runs import MOLF, assert_log_matches_reference, load, reference_run

pytestmark = pytest.mark.slow  # the HF Trainer on 2 spawned ranks

STEPS, PER_DEVICE = 3, 2
DS_AUTO = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def _trainer_worker(rank: int, world: int, model_dir: str, stage: int, samples: list, out: str) -> None:
    import deepspeed
    from datasets import Dataset
    from transformers import TrainingArguments

    import molf_ds
    from molf_ds.hf import MoLFTrainer

    deepspeed.init_distributed(dist_backend="gloo")  # on CPU, before accelerate looks for a process group
    ds = {**DS_AUTO, "zero_optimization": {"stage": stage}}
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=PER_DEVICE, max_steps=STEPS, learning_rate=MOLF["lr"],
        lr_scheduler_type="constant", train_sampling_strategy="sequential", deepspeed=ds, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, ddp_backend="gloo", max_grad_norm=0.0,
    )
    dataset = Dataset.from_dict({"input_ids": samples, "labels": samples})
    trainer = MoLFTrainer(load(model_dir, seed=0), args, molf_config=molf_ds.MoLFConfig(**MOLF),
                          routing_log=Path(out) / f"zero{stage}.routing.jsonl", train_dataset=dataset)
    trainer.train()
    if rank == 0:
        logged = [entry for entry in trainer.state.log_history if "routing/full" in entry and "loss" in entry]
        (Path(out) / f"zero{stage}.logged.json").write_text(json.dumps(logged))


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    from helpers.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("hf")
    tiny_model("qwen2", root / "model", seed=1, num_hidden_layers=3)
    batches = token_batches(STEPS, 2 * PER_DEVICE, 16, seed=2)
    samples = [row.tolist() for batch in batches for row in batch]
    for stage in (2, 3):
        spawn(_trainer_worker, 2, str(root / "model"), stage, samples, str(root))
    return reference_run(root / "model", MOLF, batches), root


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_writes_the_reference_routing(hf_runs, stage):
    reference, root = hf_runs
    lines = [json.loads(line) for line in (root / f"zero{stage}.routing.jsonl").read_text().splitlines()]
    assert_log_matches_reference(reference, lines, STEPS, f"zero{stage}")
    logged = json.loads((root / f"zero{stage}.logged.json").read_text())
    assert len(logged) == STEPS and all(0.0 <= entry["routing/full"] <= 1.0 for entry in logged)
