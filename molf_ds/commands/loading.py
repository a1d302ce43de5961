"""Loading a saved model for `molf-ds eval` and `molf-ds generate`: a transformers model directory (e.g. a run's
`final/`), a run's output directory (its `final/`), a PEFT adapter directory (e.g. `final_peft/`, merged into its
base model), a checkpoint of a run (`OUT/checkpoints/stepN`: the run's model rebuilt from OUT/config.yaml and the
checkpoint's weights, then merged), a `molf-ds models` name or a hub id, or a directory and a GGUF file in it."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .models import resolve
from .run_dir import COMPLETE, CONFIG, FINAL, of_checkpoint
from .sources import SourceError, check_model, check_tokenizer
from .train.config import saved_config
from .train.methods import merged_model, shaped_model

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module weights (ZeRO-0/1/2: full tensors)


def model_directory(path: str) -> Path:
    """`path`, or the `final/` of a run output directory."""
    directory = Path(path)
    if directory.is_dir() and not (directory / "config.json").exists() and (directory / FINAL).is_dir():
        return directory / FINAL
    return directory


def is_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint tag directory a run wrote (`OUT/checkpoints/stepN`)."""
    path = Path(path)
    return path.is_dir() and ((path / COMPLETE).is_file() or (path / MODEL_STATES).is_file()
                              or any(path.glob("zero_pp_rank_*_model_states.pt")))


def check_model_sources(model: str, tokenizer: str | None = None, gguf_file: str | None = None) -> None:
    """MODEL (an adapter's base model too, a checkpoint's run config and base model; with --gguf-file the folder
    holding it) and its tokenizer can be loaded: `SourceError` otherwise."""
    own: str | None = None  # where the tokenizer comes from without --tokenizer (None: the GGUF checkpoint)
    if gguf_file is not None:
        check_model("MODEL", model, gguf_file, gguf_key="--gguf-file")
    elif is_checkpoint(model):
        saved = _run_config(Path(model))
        base = saved["model"]["name_or_path"]
        check_model("MODEL's base model", base, saved["model"].get("gguf_file"), gguf_key="model.gguf_file",
                    point=f"set model.name_or_path in {_run_config_file(Path(model))}")
        own = saved["model"].get("tokenizer") or (None if saved["model"].get("gguf_file") else base)
    else:
        directory = model_directory(model)
        adapter = directory / "adapter_config.json"
        if adapter.is_file():
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            if not base:
                raise SourceError("MODEL", f"{adapter} names no base_model_name_or_path")
            check_model("MODEL's base model", base, point=f"set base_model_name_or_path in {adapter} to DIR")
            own = str(directory) if (directory / "tokenizer_config.json").exists() else base
        else:
            own = str(directory) if directory.exists() else model
            check_model("MODEL", own)
    if tokenizer is not None:
        check_tokenizer("--tokenizer", tokenizer)
    elif own is not None:
        check_tokenizer("--tokenizer", own, default_of="MODEL")


def load_model(path: str, tokenizer: str | None = None, dtype: str = "float32", gguf_file: str | None = None
               ) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory, a run output directory, a PEFT adapter directory, a run's
    checkpoint directory, a `molf-ds models` name or hub id, or a directory and the GGUF checkpoint in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: slow to import

    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=getattr(torch, dtype))
        return model, (load_tokenizer(tokenizer) if tokenizer else
                       AutoTokenizer.from_pretrained(path, gguf_file=gguf_file))
    if is_checkpoint(path):
        return load_checkpoint(Path(path), tokenizer, dtype)
    directory = model_directory(resolve(path))
    if directory.is_dir() and (directory / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype))
        model = model.merge_and_unload()
        base = model.config._name_or_path
        tok = load_tokenizer(tokenizer or (str(directory) if (directory / "tokenizer_config.json").exists() else base))
        return model, tok
    if directory.exists() and not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a model directory")
    model = AutoModelForCausalLM.from_pretrained(str(directory) if directory.exists() else path,
                                                 dtype=getattr(torch, dtype))
    tok = load_tokenizer(tokenizer or (str(directory) if directory.exists() else path))
    return model, tok


def load_checkpoint(path: Path, tokenizer: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """The model of a run's checkpoint `OUT/checkpoints/stepN`, merged into the vanilla architecture as the run's
    `final/` would be: the base model of OUT/config.yaml, wrapped as its method wraps it (MoLF, PEFT or none),
    the checkpoint's weights loaded, the experts folded in."""
    from transformers import AutoModelForCausalLM  # deferred: slow to import

    cfg = saved_config(_run_config(path))  # the saved config as parsed, without the checks of its data files
    m = cfg.model
    kwargs: dict[str, Any] = {"dtype": torch.float32, **({"gguf_file": m.gguf_file} if m.gguf_file else {})}
    model = shaped_model(cfg, AutoModelForCausalLM.from_pretrained(resolve(m.name_or_path), **kwargs))
    model.load_state_dict(_checkpoint_weights(path, int((cfg.deepspeed.get("zero_optimization") or {})
                                                        .get("stage", 0))), strict=True)
    model = merged_model(cfg.method, model)
    model.to(getattr(torch, dtype)).eval()
    source = tokenizer or (resolve(m.tokenizer) if m.tokenizer else None)
    if source is None and m.gguf_file:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(resolve(m.name_or_path), gguf_file=m.gguf_file)
    return model, load_tokenizer(source or resolve(m.name_or_path))


def _checkpoint_weights(path: Path, stage: int) -> dict[str, Any]:
    """The module's state dict: DeepSpeed's model states (full tensors under ZeRO-0/1/2 and in a universal
    checkpoint), or under ZeRO-3 the fp32 weights gathered from the ranks' partitions."""
    full = path / MODEL_STATES
    if full.is_file() and (stage < 3 or (path / "zero").is_dir()):
        return torch.load(full, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # deferred: slow to import

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines: stdout is generate's text
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def _run_config_file(checkpoint: Path) -> Path:
    """OUT/config.yaml of the checkpoint OUT/checkpoints/stepN: the config `molf-ds train` saved."""
    return of_checkpoint(checkpoint) / CONFIG


def _run_config(checkpoint: Path) -> dict[str, Any]:
    config = _run_config_file(checkpoint)
    if not config.is_file():
        raise SourceError("MODEL", f"{checkpoint} is a checkpoint, but {config} (the run's config, which says how "
                                   "to rebuild its model) does not exist: give MODEL as OUT/checkpoints/stepN")
    return yaml.safe_load(config.read_text())


def load_tokenizer(source: str) -> Any:
    """AutoTokenizer, except for a plain `tokenizers` tokenizer saved beside a model's config.json: transformers
    5 then picks the model type's tokenizer class (e.g. Qwen2Tokenizer) and replaces its pre-tokenizer, so it is
    loaded as the class its tokenizer_config.json names."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # deferred: slow to import

    config = Path(source) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in (
            "TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source)
