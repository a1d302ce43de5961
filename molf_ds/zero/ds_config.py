"""Checks and fills a DeepSpeed config for MoLF before any process group starts."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import deepspeed
from packaging.version import Version

TESTED_DEEPSPEED = (Version("0.19.8"), Version("0.20"))  # [low, high)
SUPPORTED_STAGES = (0, 1, 2, 3)
# DeepSpeed modes that bypass or change MoLF's step, refused by key (hpZ, `zero_hpz_partition_size`, is supported).
_ZERO_PP = ("ZeRO++ {} is lossy, so MoLF's exactness tests cannot cover it, and DeepSpeed's quantizer op it needs "
            "has no CPU build: remove it (ZeRO++'s hierarchical partitioning, zero_hpz_partition_size, is supported)")
UNSUPPORTED_ZERO = {
    "zenflow": "ZenFlow updates only selected gradient columns with its own optimizer step, bypassing MoLF's "
               "routing: remove it (for the optimizer step on CPU use offload_optimizer with device 'cpu')",
    "zero_quantized_weights": _ZERO_PP.format("weight quantization (qwZ)"),
    "zero_quantized_nontrainable_weights": _ZERO_PP.format("frozen-weight quantization"),
    "zero_quantized_gradients": _ZERO_PP.format("gradient quantization (qgZ)"),
}


def check_deepspeed_version(version: str | None = None) -> None:
    """molf_ds hooks DeepSpeed internals; refuse a release outside the tested range unless told otherwise."""
    found = Version(version or deepspeed.__version__)
    low, high = TESTED_DEEPSPEED
    if not low <= found < high and os.environ.get("MOLF_DS_ALLOW_UNTESTED_DEEPSPEED") != "1":
        raise RuntimeError(
            f"molf_ds is tested with deepspeed>={low},<{high} but deepspeed {found} is installed: "
            f"run `pip install 'deepspeed>={low},<{high}'` (or set MOLF_DS_ALLOW_UNTESTED_DEEPSPEED=1 at your risk)"
        )


def no_pipeline(what: str, remedy: str) -> ValueError:
    return ValueError(f"{what}: molf_ds does not run pipeline parallelism (each stage would route only its own "
                      f"layers): {remedy} and use data parallelism with ZeRO (stage 3 partitions a model too large "
                      "for one device)")


def load_ds_config(config: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        raise ValueError("molf_ds.initialize needs a DeepSpeed config: a dict or a JSON path such as ds_configs/zero2.json")
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist: give a JSON file path or a dict")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: line {error.lineno}: {error.msg}") from None


def prepare_ds_config(config: dict[str, Any] | str | Path | None, allow_auto: bool = False) -> dict[str, Any]:
    """A copy of `config` that DeepSpeed accepts with MoLFAdamW as client optimizer, or a ValueError naming the
    key. `allow_auto` keeps "auto" values, for the HF Trainer / accelerate integration that fills them."""
    ds = load_ds_config(config)
    if "optimizer" in ds:
        raise ValueError(
            "DeepSpeed config key 'optimizer': remove it; MoLF is the optimizer (its lrs and betas are MoLFConfig "
            "fields), and an optimizer block would make DeepSpeed drop it"
        )
    autos = [key for key, value in _walk(ds) if value == "auto"]
    if autos and not allow_auto:
        raise ValueError(
            f"DeepSpeed config key(s) {autos} are 'auto': only the HF Trainer / accelerate integration fills "
            "those; give numbers when calling molf_ds.initialize"
        )
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError("DeepSpeed config key 'zero_optimization' must be an object, e.g. {\"stage\": 2}")
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise ValueError(
            f"DeepSpeed config key 'zero_optimization.stage'={stage!r}: molf_ds supports stages {SUPPORTED_STAGES}"
        )
    for key, problem in UNSUPPORTED_ZERO.items():
        if zero.get(key) not in (None, False):
            raise ValueError(f"DeepSpeed config key 'zero_optimization.{key}': {problem}")
    if "pipeline" in ds:
        raise no_pipeline("DeepSpeed config key 'pipeline'", "remove it")
    offload = zero.get("offload_optimizer") or {}
    if offload.get("ratio", 1.0) != 1.0:
        raise ValueError(
            f"DeepSpeed config key 'zero_optimization.offload_optimizer.ratio'={offload['ratio']!r}: partial offload "
            "steps part of the parameters with DeepSpeed's own GPU AdamW, bypassing MoLF: remove it (the whole "
            "optimizer step on CPU) or remove offload_optimizer (the whole step on the GPU)"
        )
    if offload.get("super_offload"):
        raise ValueError(
            "DeepSpeed config key 'zero_optimization.offload_optimizer.super_offload': SuperOffload steps the "
            "optimizer with its own CPU Adam, bypassing MoLF: remove it (offload_optimizer with device 'cpu' runs "
            "MoLF's step on CPU)"
        )
    device = offload.get("device", "none")
    if device not in ("none", "cpu"):
        raise ValueError(
            f"DeepSpeed config key 'zero_optimization.offload_optimizer.device'={device!r}: molf_ds supports "
            "'cpu' or 'none' (NVMe offload is not supported)"
        )
    param_device = (zero.get("offload_param") or {}).get("device", "none")
    if param_device not in ("none", "cpu"):
        raise ValueError(
            f"DeepSpeed config key 'zero_optimization.offload_param.device'={param_device!r}: molf_ds supports "
            "'cpu' or 'none' (NVMe offload is not supported)"
        )
    if param_device == "cpu" and stage != 3:
        raise ValueError("DeepSpeed config key 'zero_optimization.offload_param' needs ZeRO stage 3")
    if device == "cpu" and stage == 0:
        raise ValueError("DeepSpeed config key 'zero_optimization.offload_optimizer' needs ZeRO stage 1, 2 or 3")
    accumulation = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if stage == 1 and (ds.get("bf16") or {}).get("enabled") and accumulation == "fp32" and device != "cpu":
        raise ValueError(
            "DeepSpeed config key 'data_types.grad_accum_dtype'='fp32': with bf16 at ZeRO stage 1 DeepSpeed steps "
            "through its BF16_Optimizer, which molf_ds has no adapter for: remove it, or use ZeRO stage 2 or 3"
        )
    if device == "cpu":
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(
                "DeepSpeed config key 'zero_force_ds_cpu_optimizer' is true, which replaces MoLF by DeepSpeedCPUAdam "
                "under offload: remove it or set it to false"
            )
        ds["zero_force_ds_cpu_optimizer"] = False
    if ds.get("zero_allow_untested_optimizer") is False:
        raise ValueError("DeepSpeed config key 'zero_allow_untested_optimizer' is false: remove it; MoLF needs it true")
    ds["zero_allow_untested_optimizer"] = True
    return ds


def _walk(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree
