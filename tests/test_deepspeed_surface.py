"""The DeepSpeed internals molf_ds uses are probed on a live engine: present on the installed release, and one
missing name is one line naming it and the DeepSpeed version (molf_ds/zero/surface.py)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import deepspeed
import pytest
import torch

import molf_ds
from molf_ds.zero.surface import HF_ZERO3_CONFIG, PARAM_INTERNALS, WRAPPER_INTERNALS, probe, require
from helpers.distributed import spawn
from helpers.tiny_models import tiny_model


def _errors_when_removed(rank: int, world: int, model_dir: str, out: str) -> None:
    """Per ZeRO stage: an engine built (the probe passes), then each declared wrapper and parameter internal removed
    in turn: the error probe raises."""
    deepspeed.init_distributed(dist_backend="gloo")
    errors: dict[str, list[str]] = {}
    for stage in (2, 3):
        model = tiny_model("qwen2", Path(model_dir) / f"stage{stage}")
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
        engine, *_ = molf_ds.initialize(model, molf_ds.MoLFConfig(lora_ranks=[4]), ds)
        wrapper = engine.optimizer
        owner = next(cls for cls in WRAPPER_INTERNALS if isinstance(wrapper, cls))
        param = next(p for p in engine.module.parameters() if p.requires_grad)
        removals = [(wrapper, i.name) for i in WRAPPER_INTERNALS[owner]] + [(param, i.name)
                                                                            for i in PARAM_INTERNALS[owner]]
        found = errors.setdefault(str(stage), [])
        for obj, name in removals:
            with _removed(obj, name):
                try:
                    probe(wrapper)
                    found.append("")
                except RuntimeError as error:
                    found.append(str(error))
    Path(out).write_text(json.dumps(errors))


_ABSENT = object()


@contextlib.contextmanager
def _removed(obj: object, name: str) -> Iterator[None]:
    """`obj.name` gone, from the instance and from the class that defines it, then put back."""
    own = obj.__dict__.pop(name, _ABSENT)
    owner = next((c for c in type(obj).__mro__ if name in c.__dict__), None)
    inherited = owner.__dict__[name] if owner is not None else None
    if owner is not None:
        delattr(owner, name)
    try:
        yield
    finally:
        if owner is not None:
            setattr(owner, name, inherited)
        if own is not _ABSENT:
            obj.__dict__[name] = own


@pytest.mark.slow
def test_every_declared_internal_is_probed_and_named(tmp_path):
    out = tmp_path / "errors.json"
    spawn(_errors_when_removed, 1, str(tmp_path), str(out))
    errors = json.loads(out.read_text())
    for stage, owner in (("2", "DeepSpeedZeroOptimizer"), ("3", "DeepSpeedZeroOptimizer_Stage3")):
        cls = next(c for c in WRAPPER_INTERNALS if c.__name__ == owner)
        names = [i.name for i in WRAPPER_INTERNALS[cls]] + [i.name for i in PARAM_INTERNALS[cls]]
        assert len(errors[stage]) == len(names)
        for name, error in zip(names, errors[stage]):
            assert name in error and f"deepspeed {deepspeed.__version__} does not have it" in error, (stage, name, error)
            assert "\n" not in error


def test_a_missing_transformers_internal_is_one_line():
    from transformers.integrations import deepspeed as hf_deepspeed

    require(hf_deepspeed, HF_ZERO3_CONFIG, "transformers", "0")  # present on the installed release
    with pytest.raises(RuntimeError, match=r"^molf_ds needs torch\.nn\._hf_deepspeed_config_weak_ref from transformers"):
        require(torch.nn, HF_ZERO3_CONFIG, "transformers", "0")
