"""`accelerate launch` with each preset in launch/accelerate/ (2 CPU processes, the preset's DeepSpeed JSON):
MoLF through molf_ds.hf.accelerate_prepare writes the single-process reference's routing log (winners, scores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.demo_runs import scripts_env
from helpers.distributed import free_port
from helpers.tiny_models import token_batches
from helpers.zero_runs import MOLF, assert_log_matches_reference, reference_run

pytestmark = pytest.mark.slow  # `accelerate launch`, 2 processes per preset

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers.tiny_models import tiny_model

    path = tmp_path_factory.mktemp("accelerate") / "model"
    tiny_model("qwen2", path, seed=1, num_hidden_layers=3)
    return path


@pytest.mark.parametrize("preset", ["zero2", "zero3", "zero3_offload"])
def test_accelerate_launch_preset(model_dir, tmp_path, preset):
    # the preset in fp32 with one micro-batch per step, as the reference (the preset's accumulation would scale the
    # gradients DeepSpeed sees: winners, scale-free, would still agree; the scores do not)
    ds = json.loads((ROOT / "ds_configs" / f"{preset}.json").read_text())
    ds = {**ds, "bf16": {"enabled": False}, "gradient_accumulation_steps": 1}
    config = tmp_path / f"{preset}.json"
    config.write_text(json.dumps(ds))
    yaml = (ROOT / "launch" / "accelerate" / f"{preset}.yaml").read_text()
    preset_file = tmp_path / f"{preset}.yaml"
    preset_file.write_text(yaml.replace(f"ds_configs/{preset}.json", str(config)))
    log = tmp_path / "routing.jsonl"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_file),
           "--main_process_port", str(free_port()), "--gradient_accumulation_steps", "1",
           str(ROOT / "tests" / "scripts" / "accelerate_script.py"), "--model", str(model_dir),
           "--routing-log", str(log), "--steps", str(STEPS)]
    done = subprocess.run(cmd, cwd=ROOT, env=scripts_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = reference_run(model_dir, MOLF, token_batches(STEPS, 2, 16, seed=2), clip=ds["gradient_clipping"])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert_log_matches_reference(reference, lines, STEPS, preset)
