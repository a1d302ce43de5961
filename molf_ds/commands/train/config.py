"""The `molf-ds train` YAML: schema, dotted `key=value` overrides, and validation.

Everything is checked here, before any process group starts; a problem raises `ConfigError` with one line
that names the key (`config key 'train.lr': ...`).
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from molf_ds.config import DEFAULT_TARGETS, MoLFConfig
from molf_ds.optim.molf_adamw import check_speculative_update
from molf_ds.zero.ds_config import prepare_ds_config

from ..methods import REGISTRY, TRAIN_METHODS, is_molf
from ..sources import SourceError, check_dataset, is_local
from .aliases import alias_hint
from .data import TASKS

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # transformers.get_scheduler names that need no extra arguments
TRACKERS = ("tensorboard", "wandb", "mlflow", "csv")  # train.report_to (train/tracking.py)
SHARED_OPTIMIZER_FIELDS = ("lr", "lora_lr", "weight_decay", "lora_weight_decay", "betas", "eps")  # train.*
REQUIRED = object()


class ConfigError(ValueError):
    """A bad training config; the message is one line naming the key."""


def key_error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"config key '{key}': {problem}")


@dataclass
class ModelSection:
    name_or_path: str = REQUIRED  # type: ignore[assignment]  # hub id, local directory or `molf-ds models` name
    tokenizer: str | None = None  # default: name_or_path
    gguf_file: str | None = None  # a GGUF checkpoint: file name inside name_or_path, or a path
    dtype: str = "float32"
    attn_implementation: str | None = None  # transformers' default when unset
    gradient_checkpointing: bool = False


@dataclass
class LoraSection:
    """The `lora` and `adalora` baselines (PEFT)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    init_r: int = 12  # adalora only, from here on
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    orth_reg_weight: float = 0.5


@dataclass
class DataSection:
    task: str = REQUIRED  # type: ignore[assignment]
    train: str = REQUIRED  # type: ignore[assignment]  # hub id or local .json/.jsonl/.parquet/.csv file
    split: str = "train"
    max_length: int = 512
    max_samples: int | None = None
    packing: bool = False  # rows concatenated up to max_length, attention and positions kept per row


@dataclass
class EvalSection:
    data: str | None = None  # hub id or local file; None with holdout 0: no evaluation
    split: str = "validation"
    holdout: int = 0  # or: the last `holdout` rows of data.train, kept out of training
    max_samples: int | None = None
    batch_size: int = 16
    before_training: bool = True
    max_new_tokens: int = 128  # exact-match tasks (sql, jsonl) generate greedily
    steps: int = 0  # also evaluate every N optimizer steps; 0: before and after training only
    metric: str | None = None  # the one train.load_best_model_at_end compares (loss: lower is better); default: the task's first

    @property
    def enabled(self) -> bool:
        return self.data is not None or self.holdout > 0


@dataclass
class TrainSection:
    output_dir: str = REQUIRED  # type: ignore[assignment]
    max_steps: int | None = None  # optimizer steps; or epochs
    epochs: int | None = None
    micro_batch_size: int | None = None  # per rank; default: the DeepSpeed config's
    gradient_accumulation_steps: int | None = None
    lr: float = 5e-5  # full weights (molf, fft) and everything outside the experts
    lora_lr: float = 5e-5  # LoRA experts (molf, molf-e) and the lora / adalora baselines
    weight_decay: float = 0.1
    lora_weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    seed: int = 0
    save_steps: int = 0  # 0: no intermediate checkpoints
    resume: str | None = None  # "auto" or a checkpoint directory
    save_total_limit: int | None = None  # keep the newest N complete checkpoints (and the best one); None: all
    load_best_model_at_end: bool = False  # final/ is the model of the evaluated step best at eval.metric
    collective_timeout: float = 600.0  # seconds a collective may wait (a dead rank) before the run fails
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow, csv
    logging_steps: int = 1  # trackers get every Nth optimizer step (metrics.jsonl gets every step)


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    train: TrainSection
    deepspeed: dict[str, Any]  # the DeepSpeed config, loaded when given as a path
    method: str = "molf"
    molf: dict[str, Any] = field(default_factory=dict)  # MoLFConfig fields, lrs excepted (those are train.*)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def molf_config(self) -> MoLFConfig:
        shared = {name: getattr(self.train, name) for name in SHARED_OPTIMIZER_FIELDS}
        return MoLFConfig.from_dict({**self.molf, **shared, "variant": self.method})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "lora": LoraSection,
            "eval": EvalSection}
ACCELERATE_DS_CONFIG = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
TOP_LEVEL = ("model", "method", "molf", "lora", "data", "eval", "train", "deepspeed")


# ---- loading -------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read the YAML, apply `key=value` overrides (dotted keys, YAML values), validate."""
    return validate(_build(raw_config(path, overrides)))


def from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> TrainConfig:
    return validate(_build(_apply_overrides(raw, overrides)))


def raw_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML with the overrides applied, before defaults and validation: the keys a user set (compare reads
    which `lora.*` keys are given)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"training config {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"training config {path} must be a mapping of sections ({', '.join(TOP_LEVEL)})")
    return _apply_overrides(raw, overrides)


def saved_config(raw: dict[str, Any]) -> TrainConfig:
    """A run's config.yaml as a TrainConfig, not validated again (it was when the run started; its data may have
    moved since)."""
    return _build(raw)


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    parsed = [_parse_override(item) for item in overrides]
    for keys, value in parsed:  # a new DeepSpeed config first, so that deepspeed.* overrides edit it
        if keys == ["deepspeed"]:
            raw["deepspeed"] = value
    # under `accelerate launch` with a DeepSpeed preset, the preset's JSON is the default
    raw["deepspeed"] = _load_deepspeed(raw.get("deepspeed", os.environ.get(ACCELERATE_DS_CONFIG, REQUIRED)))
    for keys, value in parsed:
        if keys != ["deepspeed"]:
            _set(raw, keys, value)
    return raw


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not key=value with a dotted key, e.g. train.max_steps=20")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def _set(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise key_error(".".join(keys[: depth + 1]), f"is {child!r}, not a section; cannot set {'.'.join(keys)}")
        node = child
    node[keys[-1]] = value


def _load_deepspeed(value: Any) -> dict[str, Any]:
    if value is REQUIRED or value is None:
        raise key_error("deepspeed", "is required: a DeepSpeed JSON path (e.g. ds_configs/zero2.json) or a mapping")
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise key_error("deepspeed", f"{value!r} is neither a JSON path nor a mapping")
    path = Path(value)
    if not path.is_file():
        raise key_error("deepspeed", f"file {path} does not exist (relative paths start at the working directory)")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise key_error("deepspeed", f"{path} is not valid JSON: line {error.lineno}: {error.msg}") from None
    if not isinstance(loaded, dict):
        raise key_error("deepspeed", f"{path} must hold a JSON object")
    return loaded


def _build(raw: dict[str, Any]) -> TrainConfig:
    _reject_unknown(raw, TOP_LEVEL, "")
    values: dict[str, Any] = {"deepspeed": raw["deepspeed"]}
    for name, cls in SECTIONS.items():
        section = raw.get(name, {})
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise key_error(name, f"must be a mapping, got {section!r}")
        values[name] = _section(cls, section, name)
    values["method"] = _coerce(raw.get("method", "molf"), str, "method")
    molf = raw.get("molf") or {}
    if not isinstance(molf, dict):
        raise key_error("molf", f"must be a mapping of MoLFConfig fields, got {molf!r}")
    values["molf"] = molf
    return TrainConfig(**values)


def _reject_unknown(values: dict[str, Any], known: typing.Iterable[str], prefix: str) -> None:
    known = list(known)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = alias_hint(key, prefix) or (f" (did you mean '{prefix}{close[0]}'?)" if close else
                                           f"; known keys: {', '.join(known)}")
            raise key_error(f"{prefix}{key}", f"is not a known key{hint}")


def _section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    _reject_unknown(values, names, prefix + ".")
    kwargs = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name}"
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], key)
        elif f.default is REQUIRED:
            raise key_error(key, "is required")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (str, int, float, bool, list[...], X | None), or a ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(value, hint, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise key_error(key, f"must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise key_error(key, f"must be {'an integer' if hint is int else hint.__name__}, got {value!r}")


# ---- validation ----------------------------------------------------------------------------------
def validate(cfg: TrainConfig) -> TrainConfig:
    m, d, e, t, lo = cfg.model, cfg.data, cfg.eval, cfg.train, cfg.lora
    _choice("method", cfg.method, TRAIN_METHODS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("data.task", d.task, tuple(TASKS))
    _choice("train.scheduler", t.scheduler, SCHEDULERS)
    for key, value in (("data.max_length", d.max_length), ("eval.batch_size", e.batch_size),
                       ("eval.max_new_tokens", e.max_new_tokens), ("lora.r", lo.r), ("lora.init_r", lo.init_r),
                       ("lora.target_r", lo.target_r), ("lora.delta_t", lo.delta_t)):
        _positive(key, value)
    for key, value in (("data.max_samples", d.max_samples), ("eval.max_samples", e.max_samples),
                       ("train.max_steps", t.max_steps), ("train.epochs", t.epochs),
                       ("train.micro_batch_size", t.micro_batch_size),
                       ("train.gradient_accumulation_steps", t.gradient_accumulation_steps)):
        if value is not None:
            _positive(key, value)
    for key, value in (("eval.holdout", e.holdout), ("train.warmup_steps", t.warmup_steps),
                       ("train.save_steps", t.save_steps), ("lora.tinit", lo.tinit), ("lora.tfinal", lo.tfinal)):
        if value < 0:
            raise key_error(key, f"must be >= 0, got {value}")
    if (t.max_steps is None) == (t.epochs is None):
        raise key_error("train.max_steps", "give exactly one of train.max_steps and train.epochs")
    if not t.collective_timeout > 0:
        raise key_error("train.collective_timeout", f"must be > 0 seconds, got {t.collective_timeout}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise key_error("train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps and t.warmup_ratio:
        raise key_error("train.warmup_ratio", "give train.warmup_steps or train.warmup_ratio, not both")
    if t.scheduler == "constant" and (t.warmup_steps or t.warmup_ratio):
        raise key_error("train.scheduler", "'constant' ignores warm-up: use 'constant_with_warmup'")
    if e.data is not None and e.holdout:
        raise key_error("eval.holdout", "give eval.data or eval.holdout, not both")
    if t.resume is not None and t.resume != "auto" and not Path(t.resume).is_dir():
        raise key_error("train.resume", f"{t.resume!r} is neither 'auto' nor a checkpoint directory")
    if REGISTRY[cfg.method].adapter == "adalora" and t.max_steps is not None and lo.tinit >= t.max_steps - lo.tfinal:
        raise key_error("lora.tinit", f"AdaLoRA needs lora.tinit < train.max_steps - lora.tfinal ({t.max_steps} - "
                        f"{lo.tfinal})")
    if lo.target_r > lo.init_r:
        raise key_error("lora.target_r", f"{lo.target_r} exceeds lora.init_r={lo.init_r}")
    for key, source in (("data.train", d.train), ("eval.data", e.data)):
        if source is not None and is_local(source):  # a hub id's turn comes in sources.check_config
            try:
                check_dataset(key, source)
            except SourceError as error:
                raise ConfigError(str(error)) from None
    if is_molf(cfg.method):
        _check_molf(cfg)
    elif cfg.molf:
        raise key_error("molf", f"is set but method is {cfg.method!r}: MoLF settings only apply to molf and molf-e "
                        "(override molf=null to drop them)")
    if d.packing:
        check_packing(m.attn_implementation)
    _check_eval_and_retention(cfg)
    _check_tracking(t)
    cfg.deepspeed = _check_deepspeed(cfg.deepspeed, t)
    return cfg


# attention implementations that keep a packed row's attention within the row: transformers builds their mask (eager,
# sdpa, flex) or variable-length calls (flash) from position_ids that restart at each row
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_packing(attn_implementation: str | None) -> None:
    """data.packing needs an attention implementation that honours packed position_ids (None: transformers'
    default, sdpa or eager)."""
    if attn_implementation is not None and attn_implementation not in PACKED_ATTENTION:
        raise key_error("data.packing", f"model.attn_implementation={attn_implementation!r} does not keep attention "
                        f"within packed rows: set model.attn_implementation to one of {', '.join(PACKED_ATTENTION)} "
                        "or data.packing=false")


def _check_eval_and_retention(cfg: TrainConfig) -> None:
    """eval.steps, eval.metric, train.save_total_limit, train.load_best_model_at_end."""
    e, t = cfg.eval, cfg.train
    if e.steps < 0:
        raise key_error("eval.steps", f"must be >= 0, got {e.steps}")
    if e.steps and not e.enabled:
        raise key_error("eval.steps", "evaluates during training but there is no evaluation data: set eval.data or "
                        "eval.holdout")
    metrics = TASKS[cfg.data.task].metrics
    if e.metric is not None and e.metric not in metrics:
        raise key_error("eval.metric", f"{e.metric!r} is not a metric of task {cfg.data.task!r}: "
                        f"{', '.join(metrics)}")
    if t.save_total_limit is not None:
        _positive("train.save_total_limit", t.save_total_limit)
        if not t.save_steps and not t.load_best_model_at_end:
            raise key_error("train.save_total_limit", "limits checkpoints but none are saved: set train.save_steps")
    if t.load_best_model_at_end:
        if not e.enabled:
            raise key_error("train.load_best_model_at_end", "needs evaluation data: set eval.data or eval.holdout")
        if not e.steps:
            raise key_error("train.load_best_model_at_end", "needs eval.steps: without evaluations during "
                            "training the best model is the final one")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise key_error(key, f"{value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise key_error(key, f"must be >= 1, got {value}")


def _check_tracking(t: TrainSection) -> None:
    """train.report_to and train.logging_steps; whether the backends are installed: sources.check_config."""
    for i, name in enumerate(t.report_to):
        _choice(f"train.report_to[{i}]", name, TRACKERS)
        if name in t.report_to[:i]:
            raise key_error(f"train.report_to[{i}]", f"{name!r} is listed twice")
    _positive("train.logging_steps", t.logging_steps)


def _check_molf(cfg: TrainConfig) -> None:
    own = [f.name for f in fields(MoLFConfig) if f.name not in SHARED_OPTIMIZER_FIELDS + ("variant",)]
    for name in cfg.molf:
        if name in SHARED_OPTIMIZER_FIELDS:
            raise key_error(f"molf.{name}", f"set train.{name} instead (every method shares it)")
        if name == "variant":
            raise key_error("molf.variant", "set by method (molf or molf-e)")
    _reject_unknown(cfg.molf, own, "molf.")
    try:
        check_speculative_update(cfg.molf_config())
    except ValueError as error:  # MoLFConfig names its field: point at the YAML key instead
        message = str(error)
        match = re.search(r"MoLFConfig(?:\.| has no field\(s\) \[')(\w+)", message)
        name = match.group(1) if match else ""
        key = f"train.{name}" if name in SHARED_OPTIMIZER_FIELDS else f"molf.{name}" if name else "molf"
        raise key_error(key, message) from None


def _check_deepspeed(ds: dict[str, Any], t: TrainSection) -> dict[str, Any]:
    """The YAML's batch numbers go into the DeepSpeed config; then molf_ds's DeepSpeed checks."""
    ds = copy.deepcopy(ds)
    for key, value in (("train_micro_batch_size_per_gpu", t.micro_batch_size),
                       ("gradient_accumulation_steps", t.gradient_accumulation_steps)):
        if value is not None:
            ds[key] = value
        ds.setdefault(key, 1)
        if isinstance(ds[key], bool) or not isinstance(ds[key], int) or ds[key] < 1:
            raise key_error(f"deepspeed.{key}", f"must be an integer >= 1, got {ds[key]!r}")
    if "train_batch_size" in ds:
        raise key_error("deepspeed.train_batch_size", "remove it: the global batch is train.micro_batch_size x "
                        "train.gradient_accumulation_steps x the number of ranks")
    try:
        ds = prepare_ds_config(ds)
    except ValueError as error:
        raise key_error("deepspeed", str(error)) from None
    _check_deepspeed_models(ds)
    return ds


def _check_deepspeed_models(ds: dict[str, Any]) -> None:
    """DeepSpeed's own schemas (pydantic) for the sections it validates, here rather than inside
    deepspeed.initialize: a wrong type, range or unknown key is one line naming it, before any process group."""
    import pydantic  # deferred: slow to import
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for name, model in (("zero_optimization", DeepSpeedZeroConfig), ("fp16", DeepSpeedFP16Config),
                        ("bf16", DeepSpeedBF16Config)):
        section = ds.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise key_error(f"deepspeed.{name}", f"must be a mapping, got {section!r}")
        try:
            model(**section)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            key = f"deepspeed.{name}" + (f".{where}" if where else "")
            raise key_error(key, f"{first['msg']} (got {first.get('input')!r})".replace("\n", " ")) from None
        except (TypeError, ValueError) as error:
            raise key_error(f"deepspeed.{name}", str(error).splitlines()[0] if str(error) else repr(error)) from None
    for key in ("gradient_clipping", "steps_per_print"):
        value = ds.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise key_error(f"deepspeed.{key}", f"must be a number >= 0, got {value!r}")
    if (ds.get("fp16") or {}).get("enabled") and (ds.get("bf16") or {}).get("enabled"):
        raise key_error("deepspeed.fp16.enabled", "fp16 and bf16 are both enabled: choose one")
    if (ds.get("fp16") or {}).get("enabled"):
        _check_fp16_kernels()


def _check_fp16_kernels() -> None:
    """deepspeed.initialize refuses fp16 on a CPU whose oneDNN has no fp16 kernels (no AVX512-FP16 / AMX-FP16):
    one line here instead, before any process group."""
    from deepspeed.accelerator import get_accelerator  # deferred: slow to import

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():
        return
    instead = "bf16 instead (deepspeed.bf16.enabled: true) or fp32" if accelerator.is_bf16_supported() else \
        "fp32 instead (no bf16 either)"
    raise key_error("deepspeed.fp16.enabled", f"DeepSpeed's {accelerator.device_name()} accelerator has no fp16 "
                    f"kernels on this machine (a CPU without AVX512-FP16 / AMX-FP16): set it false and use {instead}")
