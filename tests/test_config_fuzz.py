"""Config fuzzing (hypothesis): a valid training config with one random fault (a wrong type, an unknown key,
an out-of-range value, contradictory offload settings, a missing file) always fails in the config loader with
one line naming the key, before any process group; the CLI prints that line and exits 2."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.distributed import FP16_SUPPORTED
from molf_ds.commands.train import ConfigError, from_dict

WRONG = st.sampled_from(["abc", [1, 2], {"a": 1}, True, -3, 2.5, None, ""])
# (dotted key, values that are wrong for it, a word the error line must hold)
TYPED = [
    ("train.max_steps", ["ten", 0, -1, 2.5, [3]]), ("train.lr", ["fast", [1e-3], {"x": 1}]),
    ("train.save_steps", [-1, "often"]), ("train.warmup_ratio", [1.5, -0.1, "x"]),
    ("train.collective_timeout", [0, -5, "long"]), ("train.seed", ["s", 1.5]), ("train.betas", [0.9, "b"]),
    ("train.scheduler", ["sometimes", 3]), ("method", ["sgd", 3, ["molf"]]), ("model.dtype", ["float8", 16]),
    ("data.task", ["poetry", 1]), ("data.max_length", [0, -1, "long"]), ("eval.batch_size", [0, "big"]),
    ("eval.holdout", [-1]), ("lora.r", [0, "four"]), ("molf.lora_ranks", ["eight", [0], [-4]]),
    ("molf.top_k", [0, "one", 9]), ("molf.score", ["magic"]), ("molf.lora_dropout", [1.5, -0.1]),
    ("deepspeed.zero_optimization.stage", [4, -1, "two"]),
    ("deepspeed.zero_optimization.reduce_bucket_size", ["big", [1]]),
    ("deepspeed.zero_optimization.offload_optimizer.device", ["nvme0", 3]),
    ("deepspeed.fp16.enabled", ["maybe", [1]]), ("deepspeed.gradient_clipping", ["high", -1]),
    ("deepspeed.train_micro_batch_size_per_gpu", [0, "four", 1.5]),
    ("deepspeed.gradient_accumulation_steps", [0, "x"]),
]
SECTIONS = ["train", "model", "data", "eval", "lora", "molf", "deepspeed.zero_optimization", ""]
CONTRADICTIONS = [
    ({"deepspeed.zero_optimization.offload_param": {"device": "cpu"}, "deepspeed.zero_optimization.stage": 2},
     "offload_param"),
    ({"deepspeed.zero_optimization.offload_optimizer": {"device": "cpu"}, "deepspeed.zero_optimization.stage": 0},
     "offload_optimizer"),
    ({"deepspeed.zero_optimization.offload_optimizer": {"device": "cpu"},
      "deepspeed.zero_force_ds_cpu_optimizer": True}, "zero_force_ds_cpu_optimizer"),
    ({"deepspeed.fp16": {"enabled": True}, "deepspeed.bf16": {"enabled": True}}, "fp16"),
    ({"deepspeed.optimizer": {"type": "AdamW"}}, "optimizer"),
    ({"train.epochs": 2}, "train.max_steps"),
    ({"train.warmup_steps": 3, "train.warmup_ratio": 0.1}, "train.warmup_ratio"),
    ({"eval.holdout": 3, "eval.data": "train.jsonl"}, "eval.holdout"),
    ({"method": "lora", "molf.lora_ranks": [4]}, "molf"),
    ({"lora.target_r": 20, "lora.init_r": 8}, "lora.target_r"),
    ({"data.train": "missing.jsonl"}, "data.train"), ({"eval.data": "nowhere.json"}, "eval.data"),
    ({"train.resume": "no/such/dir"}, "train.resume"), ({"deepspeed": "missing.json"}, "deepspeed"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return root, {
        "model": {"name_or_path": "some/model"},
        "molf": {"lora_ranks": [8]},
        "data": {"task": "jsonl", "train": str(root / "train.jsonl")},
        "train": {"output_dir": str(root / "out"), "max_steps": 10},
        "deepspeed": {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
    }


def _set(raw: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def _fails_on(raw: dict, root: Path, word: str) -> str:
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(ConfigError) as caught:
            from_dict(raw)
    finally:
        os.chdir(cwd)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("config key '") and word in line, line
    return line


def test_base_config_is_valid(base):
    root, raw = base
    from_dict(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_types_and_out_of_range_values_name_the_key(base, data):
    root, raw = base
    raw = copy.deepcopy(raw)
    key, values = data.draw(st.sampled_from(TYPED))
    value = data.draw(st.sampled_from(values))
    _set(raw, key, value)
    _fails_on(raw, root, key.split(".")[-1])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(SECTIONS), name=st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True), value=WRONG)
def test_unknown_keys_name_the_key(base, section, name, value):
    root, raw = base
    raw = copy.deepcopy(raw)
    key = f"{section}.{name}" if section else name
    known = {"train": from_dict(raw).train.__dataclass_fields__, "model": from_dict(raw).model.__dataclass_fields__,
             "data": from_dict(raw).data.__dataclass_fields__, "eval": from_dict(raw).eval.__dataclass_fields__,
             "lora": from_dict(raw).lora.__dataclass_fields__}
    from molf_ds.config import MoLFConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    taken = (set(known.get(section, ())) | set(MoLFConfig.__dataclass_fields__) | set(DeepSpeedZeroConfig.model_fields)
             | {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
             | {"model", "method", "molf", "lora", "data", "eval", "train", "deepspeed"})
    if name in taken:
        return
    _set(raw, key, value)
    _fails_on(raw, root, name)


@pytest.mark.parametrize("changes,word", CONTRADICTIONS, ids=[w for _, w in CONTRADICTIONS])
def test_contradictions_and_missing_files_name_the_key(base, changes, word):
    root, raw = base
    raw = copy.deepcopy(raw)
    for key, value in changes.items():
        if key == "deepspeed" and isinstance(value, str):
            raw["deepspeed"] = value
        else:
            _set(raw, key, value)
    _fails_on(raw, root, word)


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    ("deepspeed.zero_optimization.stage=two", "stage"),
    ("deepspeed.zero_optimization.offload_param.device=cpu", "offload_param"),
    pytest.param("deepspeed.fp16.enabled=true", "fp16.enabled", marks=pytest.mark.skipif(
        FP16_SUPPORTED, reason="this machine has fp16 kernels: DeepSpeed trains in fp16 here")),
])
def test_cli_prints_one_line_and_exits_2_before_any_process_group(base, override, key):
    root, raw = base
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "molf_ds.commands.train", str(root / "run.yaml"), override],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("molf-ds train:")]
    assert len(lines) == 1 and key in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "init_distributed" not in result.stderr
