"""Issue 21: a config key of HF Trainer / TRL / LLaMA-Factory / axolotl is answered with ours (`did you mean
'train.lr'?`), at the top level, inside a section and as a key=value override; typos keep difflib's answer."""
from __future__ import annotations

import pytest

from molf_ds.commands.train import ConfigError, from_dict
from molf_ds.commands.train.aliases import ALIASES

BASE = {
    "model": {"name_or_path": "some/model"},
    "data": {"task": "jsonl", "train": "train.jsonl"},
    "train": {"output_dir": "out", "max_steps": 10},
    "deepspeed": {"zero_optimization": {"stage": 2}},
}


@pytest.fixture(autouse=True)
def data_file(tmp_path, monkeypatch):
    """data.train exists: a key can be checked past the sections (molf's keys are checked last)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')


def error_of(raw: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as caught:
        from_dict(raw, overrides)
    return str(caught.value)


@pytest.mark.parametrize("key,value,want", [
    ("learning_rate", 1e-4, "did you mean 'train.lr' or 'train.lora_lr'?"),
    ("num_train_epochs", 3, "did you mean 'train.epochs'?"),
    ("model_name_or_path", "org/model", "did you mean 'model.name_or_path'?"),
    ("cutoff_len", 1024, "did you mean 'data.max_length'?"),
    ("lora_r", 8, "did you mean 'lora.r' or 'molf.lora_ranks'?"),
    ("save_total_limit", 2, "did you mean 'train.save_total_limit'?"),  # a key being added: the text is enough
    ("val_set_size", 0.05, "did you mean 'eval.holdout'?"),
])
def test_top_level_key_of_another_trainer(key, value, want):
    message = error_of({**BASE, key: value})
    assert message.startswith(f"config key '{key}': is not a known key (") and want in message
    assert (f"'{key}' is what other trainers call it" in message) == (key != "save_total_limit")  # ours, elsewhere


@pytest.mark.parametrize("section,key,want", [
    ("train", "per_device_train_batch_size", "'train.micro_batch_size'"),
    ("train", "lr_scheduler_type", "'train.scheduler'"),
    ("train", "eval_steps", "'eval.steps'"),
    ("train", "bf16", "'model.dtype'"),
    ("data", "sample_packing", "'data.packing'"),
    ("model", "base_model", "'model.name_or_path'"),
    ("lora", "lora_alpha", "'lora.alpha' or 'molf.lora_alphas'"),
    ("lora", "lora_target_modules", "'lora.target_modules' or 'molf.target_modules'"),
    ("model", "max_steps", "'train.max_steps'"),  # our own key, in the wrong section
])
def test_key_inside_a_section(section, key, want):
    raw = {**BASE, section: {**BASE.get(section, {}), key: 1}}
    assert error_of(raw).startswith(f"config key '{section}.{key}': is not a known key (did you mean {want}?")


def test_the_section_s_own_key_comes_first():
    raw = {**BASE, "method": "molf", "molf": {"lora_alpha": 16}}
    assert "did you mean 'molf.lora_alphas' or 'lora.alpha'?" in error_of(raw)


@pytest.mark.parametrize("override,want", [
    ("gradient_accumulation_steps=4", ("config key 'gradient_accumulation_steps': is not a known key (did you mean "
                                       "'train.gradient_accumulation_steps'?)")),
    ("train.learning_rate=1e-4", "config key 'train.learning_rate': is not a known key (did you mean 'train.lr'"),
    ("train.output_dir=o", None),  # ours: accepted
    ("train.max_step=3", "config key 'train.max_step': is not a known key (did you mean 'train.max_steps'?)"),
])
def test_overrides(override, want):
    if want is None:
        assert from_dict(BASE, [override]).train.output_dir == "o"
    else:
        assert error_of(BASE, [override]).startswith(want)


def test_every_alias_points_at_a_dotted_key_or_deepspeed():
    for key, targets in ALIASES.items():
        assert key == key.lower() and targets, key
        for target in targets:
            assert target == "deepspeed" or target == "method" or "." in target, (key, target)
