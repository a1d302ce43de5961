"""The training YAML: dotted overrides, DeepSpeed config loading, and one-line errors naming the key, raised
before any process group starts (the CLI exits 2 with that line)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.distributed import FP16_SUPPORTED
from molf_ds.commands.train import ConfigError, load_config
from molf_ds.commands.train.checkpoints import COMPLETE, find_resume
from molf_ds.commands.train.loop import RoutingWatch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """A minimal valid YAML in tmp_path (the working directory), with data and a DeepSpeed JSON beside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    raw = {
        "model": {"name_or_path": "some/model"},
        "molf": {"lora_ranks": [8]},
        "data": {"task": "jsonl", "train": "train.jsonl"},
        "train": {"output_dir": "out", "max_steps": 10},
        "deepspeed": "ds.json",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_overrides_and_deepspeed_numbers(config_file):
    cfg = load_config(config_file, ["train.lr=1e-3", "molf.lora_ranks=[4,8]", "molf.lora_alphas=[8,16]",
                                    "train.micro_batch_size=4", "deepspeed.zero_optimization.stage=1",
                                    "method=molf-e", "molf.score=ldw"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML reads 1e-3 as a string
    molf = cfg.molf_config()
    assert molf.variant == "molf-e" and molf.lora_ranks == (4, 8) and molf.lr == 1e-3 and molf.score == "ldw"
    assert cfg.deepspeed["zero_optimization"]["stage"] == 1
    assert cfg.deepspeed["train_micro_batch_size_per_gpu"] == 4 and cfg.deepspeed["gradient_accumulation_steps"] == 1
    assert cfg.deepspeed["gradient_clipping"] == 1.0 and cfg.deepspeed["zero_allow_untested_optimizer"] is True


def test_baseline_drops_molf_section(config_file):
    cfg = load_config(config_file, ["method=lora", "molf=null", "lora.r=4"])
    assert cfg.method == "lora" and cfg.molf == {} and cfg.lora.r == 4


@pytest.mark.parametrize("override,key", [
    ("train.max_step=3", "train.max_step"),
    ("bogus=1", "bogus"),
    ("method=sgd", "method"),
    ("model.dtype=float8", "model.dtype"),
    ("data.task=poetry", "data.task"),
    ("data.train=missing.parquet", "data.train"),
    ("data.max_length=0", "data.max_length"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=fast", "train.lr"),
    ("train.epochs=2", "train.max_steps"),
    ("train.scheduler=cyclic", "train.scheduler"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.resume=nowhere", "train.resume"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("eval.holdout=-1", "eval.holdout"),
    ("molf.lora_ranks=[]", "molf.lora_ranks"),
    ("molf.top_k=5", "molf.top_k"),
    ("molf.score=l2", "molf.score"),
    ("molf.lr=1", "molf.lr"),
    ("molf.rank=8", "molf.rank"),
    ("method=fft", "molf"),
    ("deepspeed=nope.json", "deepspeed"),
    ("deepspeed.optimizer={}", "deepspeed"),
    ("deepspeed.train_batch_size=64", "deepspeed.train_batch_size"),
    ("deepspeed.zero_optimization.stage=7", "deepspeed"),
    ("train", None),
])
def test_error_names_the_key(config_file, override, key):
    with pytest.raises(ConfigError) as error:
        load_config(config_file, [override])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"config key '{key}':" if key else "override 'train'")


def test_speculative_update_without_the_cpp_kernel_is_one_line(config_file, monkeypatch):
    monkeypatch.setenv("MOLF_DS_KERNEL", "torch")
    with pytest.raises(ConfigError, match="^config key 'molf.speculative_update': MoLFConfig.speculative_update=True "
                                          r"needs the C\+\+ CPU kernel, which is turned off by MOLF_DS_KERNEL=torch"):
        load_config(config_file, ["molf.speculative_update=true"])


@pytest.mark.skipif(FP16_SUPPORTED, reason="this machine has fp16 kernels: DeepSpeed trains in fp16 here")
def test_fp16_without_fp16_kernels_is_one_line_naming_bf16(config_file):
    """DeepSpeed itself would refuse inside deepspeed.initialize, after the process group started."""
    with pytest.raises(ConfigError, match=r"^config key 'deepspeed.fp16.enabled': DeepSpeed's cpu accelerator has no "
                                          r"fp16 kernels .*: set it false and use bf16 instead .* or fp32$"):
        load_config(config_file, ["deepspeed.fp16.enabled=true"])
    assert load_config(config_file, ["deepspeed.bf16.enabled=true"]).deepspeed["bf16"] == {"enabled": True}


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(config_file):
    result = subprocess.run([sys.executable, "-m", "molf_ds.commands.train", str(config_file), "train.max_steps=0"],
                            capture_output=True, text=True, cwd=config_file.parent, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "molf-ds train: config key 'train.max_steps': must be >= 1, got 0"


def test_find_resume_skips_incomplete_checkpoints(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        (tmp_path / f"step{step}").mkdir()
        if complete:
            (tmp_path / f"step{step}" / COMPLETE).write_text(json.dumps({"step": step}))
    assert find_resume(None, tmp_path) is None
    assert find_resume("auto", tmp_path).tag == "step10"
    assert find_resume("auto", tmp_path / "nothing-yet") is None  # auto on a fresh run starts from scratch
    assert find_resume(str(tmp_path / "step5"), tmp_path).step == 5
    with pytest.raises(ConfigError, match="config key 'train.resume'"):
        find_resume(str(tmp_path / "step15"), tmp_path)


def test_routing_watch_warns_once_when_one_expert_takes_it_all():
    watch = RoutingWatch()
    warnings = [watch.add({"full": 0.0, "lora0": 1.0}) for _ in range(99)]
    assert not any(warnings)
    warning = watch.add({"full": 0.0, "lora0": 1.0})
    assert "effectively running as 'lora0' alone" in warning and "train.lr / train.lora_lr" in warning
    assert watch.add({"full": 0.0, "lora0": 1.0}) is None
    mixed = RoutingWatch()
    assert not any(mixed.add({"full": 0.5, "lora0": 0.5}) for _ in range(200))


def test_examples_are_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "examples").glob("*.yaml")):
        # the demos' data is generated by launch/demo.sh and demo_tiny.sh: any existing .json file stands in here
        demo = path.stem.startswith("demo")
        stand_in = ["data.train=ds_configs/zero2.json", "eval.data=ds_configs/zero2.json"] if demo else []
        load_config(path, stand_in)
