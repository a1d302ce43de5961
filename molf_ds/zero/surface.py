"""Every DeepSpeed internal molf_ds reads or patches, declared in one place and probed when an engine is attached.

molf_ds routes inside DeepSpeed's optimizer wrappers, so it depends on names DeepSpeed does not promise to keep.
`probe` checks them all on the live wrapper and its parameters before the first step: a DeepSpeed whose internals
moved fails with one line naming what is missing and the installed version, not an AttributeError inside a step.
The one transformers internal (`HF_ZERO3_CONFIG`) is checked where it is used, through `require`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


@dataclass(frozen=True)
class Internal:
    name: str
    use: str  # what molf_ds does with it


_STEP = Internal("step", "wrapped so that one wrapper step is one MoLF step (adapters/base.py)")
_DP_GROUP = Internal("dp_process_group", "the group of the score all-reduce")

# Attributes of each optimizer wrapper molf_ds supports (adapters/).
WRAPPER_INTERNALS: dict[type, tuple[Internal, ...]] = {
    DeepSpeedZeroOptimizer: (
        _STEP, _DP_GROUP,
        Internal("bit16_groups", "the model parameters of each param group"),
        Internal("single_partition_of_fp32_groups", "the flat fp32 partition the optimizer steps"),
    ),
    DeepSpeedZeroOptimizer_Stage3: (
        _STEP, _DP_GROUP,
        Internal("fp16_groups", "the parameters of each sub-group"),
        Internal("fp32_partitioned_groups_flat", "the flat fp32 tensor of each sub-group"),
        Internal("sub_group_to_group_id", "which param group a sub-group belongs to"),
        Internal("persistent_parameters", "the replicated LoRA experts, re-gathered after each step"),
        Internal("zero_hpz_partition_size", "whether hierarchical partitioning owns the re-gather"),
        Internal("_reassign_or_swap_out_partitioned_parameters", "patched: held back until routing is done"),
        Internal("_post_step", "patched: routing and the coalesced re-gather before it"),
    ),
    FP16_UnfusedOptimizer: (
        _STEP,
        Internal("fp16_groups", "the model parameters of each param group"),
        Internal("fp32_groups", "their fp32 copies, which the optimizer steps"),
    ),
}

# Attributes DeepSpeed sets on each model parameter under the wrapper (checked on every trainable parameter).
PARAM_INTERNALS: dict[type, tuple[Internal, ...]] = {
    DeepSpeedZeroOptimizer: (
        Internal("_hp_mapping", "where the parameter lies in this rank's fp32 partition"),
    ),
    DeepSpeedZeroOptimizer_Stage3: (
        Internal("partition_numel", "the size of each rank's slice"),
        Internal("ds_numel", "the parameter's size, to exclude the last slice's padding"),
        Internal("ds_persist", "set on the LoRA experts to keep them gathered"),
        Internal("ds_status", "whether a partition needs re-gathering"),
        Internal("ds_tensor", "this rank's partition"),
        Internal("ds_process_group", "the group a parameter is partitioned over"),
        Internal("ds_shape", "the parameter's shape when re-gathered"),
        Internal("all_gather", "the first gather of the resident experts"),
    ),
    FP16_UnfusedOptimizer: (),
}

# In transformers.integrations.deepspeed.
HF_ZERO3_CONFIG = Internal("_hf_deepspeed_config_weak_ref",
                           "cleared while a merged model is saved, so that transformers does not gather it again")


def missing_line(what: str, use: str, package: str = "deepspeed", version: str = deepspeed.__version__) -> str:
    """The one-line error for an internal that is not where molf_ds expects it."""
    return (f"molf_ds needs {what} from {package} ({use}), but {package} {version} does not have it: install a "
            f"{package} release in molf_ds's tested range (pyproject.toml)")


def require(module: Any, internal: Internal, package: str, version: str) -> Any:
    """`module`'s attribute `internal.name`, or a RuntimeError in one line naming it."""
    if not hasattr(module, internal.name):
        raise RuntimeError(missing_line(f"{module.__name__}.{internal.name}", internal.use, package, version))
    return getattr(module, internal.name)


def probe(wrapper: Any) -> None:
    """Every internal that molf_ds uses on this wrapper and its parameters exists; a RuntimeError naming the first
    missing one otherwise."""
    kind = type(wrapper)
    owner = next((cls for cls in WRAPPER_INTERNALS if isinstance(wrapper, cls)), None)
    if owner is None:
        return
    for internal in WRAPPER_INTERNALS[owner]:
        if not hasattr(wrapper, internal.name):
            raise RuntimeError(missing_line(f"{kind.__name__}.{internal.name}", internal.use))
    groups = wrapper.bit16_groups if owner is DeepSpeedZeroOptimizer else wrapper.fp16_groups
    for internal in PARAM_INTERNALS[owner]:
        if any(not hasattr(p, internal.name) for group in groups for p in group):
            raise RuntimeError(missing_line(f"parameter attribute {internal.name} under {kind.__name__}",
                                            internal.use))
