"""The `molf-ds train` run config the end-to-end tests start from: the generated demo task and tiny model,
MoLF r=4 on ZeRO-2 unless a test says otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from molf_ds.commands.datagen.demo import generate

REPO = Path(__file__).resolve().parents[2]


def scripts_env(**extra: str) -> dict[str, str]:
    """The environment of tests/scripts/*: the repository root (benchmarks.lab) and tests/ (helpers) importable,
    one thread per rank."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


ZERO2 = str(REPO / "ds_configs" / "zero2.json")


def train_on_two_ranks(root: Path, *overrides: str) -> str:
    """`molf-ds train root/run.yaml` under torchrun on 2 CPU ranks; its notices, from stderr (the run must succeed
    and print only the output directory on stdout)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "molf_ds.commands.train", str(root / "run.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert only_the_output_directory(result.stdout), result.stdout[-3000:]
    return result.stderr


def only_the_output_directory(stdout: str) -> bool:
    """`molf-ds train`'s stdout: one line, the output directory it wrote."""
    lines = stdout.splitlines()
    return len(lines) == 1 and Path(lines[0]).is_dir()


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_demo_run(root: Path, *, n_cases: int = 32, seed: int = 3, lora_dropout: float = 0.0,
                   eval_samples: int | None = None, **sections: Any) -> dict[str, Any]:
    """Generate the demo under root/demo and write root/run.yaml; `sections` (train, eval, deepspeed, ...) are
    added as given; `eval_samples` evaluates on the training facts. Returns the config."""
    paths = generate(root / "demo", n_cases=n_cases, seed=seed)
    raw: dict[str, Any] = {
        "model": {"name_or_path": str(paths["model"]), "tokenizer": str(paths["tokenizer"]),
                  "attn_implementation": "eager"},
        "method": "molf",
        "molf": {"lora_ranks": [4], "lora_alphas": [8], "lora_dropout": lora_dropout},
        "data": {"task": "fact", "train": str(paths["data"]), "max_length": 32},
    }
    if eval_samples is not None:
        raw["eval"] = {"data": str(paths["data"]), "max_samples": eval_samples, "batch_size": 16}
    raw.update(sections)
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    return raw
