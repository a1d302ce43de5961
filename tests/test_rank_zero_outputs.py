"""Rank-0-only outputs are written once per step whatever the order of setup: the README's Python snippet under
torchrun on 2 ranks, with the process group started inside `molf_ds.initialize` (by DeepSpeed) or before it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.demo_runs import REPO, scripts_env
from helpers.distributed import free_port

pytestmark = pytest.mark.slow  # torchrun, 2 ranks

STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers.tiny_models import tiny_model

    directory = tmp_path_factory.mktemp("readme") / "model"
    tiny_model("qwen2", directory, seed=1)
    return directory


@pytest.mark.parametrize("init_first", [False, True], ids=["group-started-by-initialize", "init-distributed-first"])
def test_readme_snippet_logs_each_step_once(model_dir, tmp_path, init_first):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "tests" / "scripts" / "readme_script.py"), "--model", str(model_dir),
               "--out", str(tmp_path), "--steps", str(STEPS)] + (["--init-distributed-first"] if init_first else [])
    done = subprocess.run(command, cwd=tmp_path, env=scripts_env(TOKENIZERS_PARALLELISM="false"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert (tmp_path / "final" / "config.json").is_file()
