"""Can the model, tokenizer and data be loaded? Checked before any process group starts, without downloading.

A value is a local path when it exists or looks like one (absolute, `.` or `~` first, more than one `/`, or a first
component that exists here, as in `runs/nonexist`); otherwise a hub id, found in the local Hugging Face caches
(models and tokenizers: HF_HUB_CACHE; datasets: the `datasets` cache, which is what `load_dataset` reads offline)
or, when HF_HUB_OFFLINE is unset and nothing is cached, asked of the hub. A problem raises `SourceError`: one line
naming the key (a config key such as `model.name_or_path`, or a command's argument such as `--data` or `MODEL`)
and saying what to do.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .models import MODELS, is_prepared, model_dir

if TYPE_CHECKING:
    from .train.config import TrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
CONFIG_KEY = re.compile(r"[a-z_]+(\.[a-z_]+)+")
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}  # local file -> datasets loader
# train.report_to backend -> (module that must be importable, pip package); the extras in pyproject carry the names
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "mlflow": ("mlflow", "mlflow-skinny")}


class SourceError(ValueError):
    """A model, tokenizer or dataset that cannot be loaded; the message is one line naming the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{_label(key)}: {problem}")


def check_config(cfg: TrainConfig) -> None:
    """Every source a `molf-ds train` config loads: model, tokenizer, training and evaluation data; and the
    experiment trackers it reports to."""
    m = cfg.model
    check_model("model.name_or_path", m.name_or_path, m.gguf_file, gguf_key="model.gguf_file")
    if m.tokenizer is not None:
        check_tokenizer("model.tokenizer", m.tokenizer)
    elif m.gguf_file is None:  # a GGUF file carries its tokenizer
        check_tokenizer("model.tokenizer", m.name_or_path, default_of="model.name_or_path")
    if cfg.data.task == "chat" and (m.tokenizer is not None or m.gguf_file is None):
        check_chat_template("model.tokenizer", m.tokenizer or m.name_or_path)
    check_dataset("data.train", cfg.data.train)
    if cfg.eval.data is not None:
        check_dataset("eval.data", cfg.eval.data)
    check_trackers("train.report_to", cfg.train.report_to)


def is_local(source: str) -> bool:
    """A data source that is a local file (a known suffix, or it exists), not a hub dataset id."""
    return Path(source).suffix in FORMATS or Path(source).exists()


def check_trackers(key: str, report_to: list[str]) -> None:
    """The experiment trackers named in `report_to` are installed (molf_ds.commands.train.tracking)."""
    if problem := missing_trackers(report_to):
        raise SourceError(key, problem)


def missing_trackers(report_to: Iterable[str]) -> str | None:
    """The problem with the first backend of `report_to` that is not installed, one line with the pip command;
    None when all are."""
    for name in report_to:
        if name in TRACKER_PACKAGES:
            module, package = TRACKER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                return f"{name} is not installed: pip install {package} (or \"molf-ds[{name}]\")"
    return None


def check_model(key: str, name_or_path: str, gguf_file: str | None = None, *,
                gguf_key: str | None = None, point: str | None = None) -> None:
    """`name_or_path` is a model directory (config.json), a hub model that is cached or on a reachable hub, or, with
    `gguf_file` (named by `gguf_key`), the local directory holding that GGUF file. `point`: how to give another
    value, when not by `key` itself (e.g. a PEFT adapter's base model)."""
    point = point or _point(key, "DIR")
    if _registry(key, name_or_path):
        return
    if gguf_file is not None:
        _check_gguf(key, name_or_path, gguf_key or "gguf_file", gguf_file)
        return
    cached = functools.partial(_hub_cached, files=("config.json",))
    if not _is_path(key, name_or_path, cached):
        _check_hub(key, name_or_path, "model", cached, point)
        return
    path = Path(name_or_path)
    if not path.exists():
        raise SourceError(key, _missing(name_or_path))
    if path.is_file():
        if path.suffix == ".gguf" and gguf_key:
            raise SourceError(key, f"{name_or_path} is a GGUF file: set {gguf_key}={path.name} and "
                                   f"{_point(key, str(path.parent))}")
        raise SourceError(key, f"{name_or_path} is a file, not a model directory (the one holding config.json)")
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files: set {gguf_key}={ggufs[0]}" if ggufs and gguf_key else ""
        raise SourceError(key, f"{name_or_path} is not a model directory (no config.json){hint}")


def check_tokenizer(key: str, name_or_path: str, default_of: str | None = None) -> None:
    """A tokenizer directory or a hub id; `default_of`: the key whose value stands in when `key` is not set
    (the model's), which the message then names."""
    if _registry(key, name_or_path):
        return
    cached = functools.partial(_hub_cached, files=TOKENIZER_FILES[:2])
    if not _is_path(key, name_or_path, cached):
        _check_hub(key, name_or_path, "model", cached, _point(key, "DIR"))
        return
    path = Path(name_or_path)
    if default_of is not None and path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise SourceError(key, f"unset, so the tokenizer comes from {default_of} ({name_or_path}), which holds "
                                   f"none of {', '.join(TOKENIZER_FILES)}: {_point(key, 'DIR')} (a tokenizer "
                                   "directory or hub id)")
        return
    if not path.exists():
        raise SourceError(key, _missing(name_or_path))
    if not path.is_dir():
        raise SourceError(key, f"{name_or_path} is a file, not a tokenizer directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(key, f"{name_or_path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def check_chat_template(key: str, name_or_path: str) -> None:
    """The tokenizer (`data.task: chat`) has a chat template, where that shows without loading it: a local or
    prepared `molf-ds models` directory, or a hub tokenizer whose files are cached; otherwise loading checks."""
    from huggingface_hub import try_to_load_from_cache  # deferred: slow to import

    names = ("chat_template.jinja", "chat_template.json")
    if name_or_path in MODELS and not Path(name_or_path).exists():
        if not is_prepared(name_or_path):
            return
        directory = model_dir(name_or_path)
    elif Path(name_or_path).is_dir():
        directory = Path(name_or_path)
    else:  # a hub id: cached files only
        found = [try_to_load_from_cache(name_or_path, name) for name in ("tokenizer_config.json", *names)]
        if any(isinstance(f, str) for f in found[1:]):
            return
        if not isinstance(found[0], str) or any(f is None for f in found[1:]):  # unknown: the loader checks
            return
        directory = Path(found[0]).parent
    if any((directory / name).is_file() for name in names) or (directory / "additional_chat_templates").is_dir():
        return
    config = directory / "tokenizer_config.json"
    try:
        if config.is_file() and json.loads(config.read_text()).get("chat_template"):
            return
    except (ValueError, AttributeError):
        return  # unreadable: the loader reports it
    raise SourceError(key, f"data.task is chat but the tokenizer {name_or_path} has no chat template: "
                           f"{_point(key, 'DIR')} (a tokenizer that has one, e.g. the instruct model's)")


def check_dataset(key: str, source: str) -> None:
    """A local .json/.jsonl/.parquet/.csv file, or a hub dataset that is cached or on a reachable hub."""
    if not (is_local(source) or _is_path(key, source, _dataset_cached)):
        files = ", ".join(FORMATS)
        _check_hub(key, source, "dataset", _dataset_cached, f"{_point(key, 'FILE')}, one of its {files} files")
        return
    path = Path(source)
    if not path.exists():
        raise SourceError(key, f"file {_missing(source)}")
    if path.is_dir():
        raise SourceError(key, f"{source} is a directory: give one {', '.join(FORMATS)} file")
    if path.suffix not in FORMATS:
        raise SourceError(key, f"{source}: unsupported file type {path.suffix or '(no extension)'!r}: use "
                               f"{', '.join(FORMATS)}")


# ---- local paths ---------------------------------------------------------------------------------
def _is_path(key: str, value: str, cached: Callable[[str], bool]) -> bool:
    """Whether `value` is checked as a local path; False: a hub id (NAME or OWNER/NAME) that does not look like a
    path, or is cached although it does (./Qwen/ beside the hub id Qwen/Qwen2.5-3B)."""
    from huggingface_hub.errors import HFValidationError  # deferred: slow to import
    from huggingface_hub.utils import validate_repo_id

    if not value.strip():
        raise SourceError(key, "is empty")
    path = Path(value)
    if path.exists():
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    if path.is_absolute() or value.startswith((".", "~")) or Path(path.parts[0]).exists():
        return not cached(value)
    return False


def _registry(key: str, value: str) -> bool:
    """Whether `value` is a `molf-ds models` name (not shadowed by a local path) that can be prepared."""
    if value not in MODELS or Path(value).exists():
        return False
    entry = MODELS[value]
    if not (is_prepared(value) or entry.installed()):
        raise SourceError(key, f"{value} is a `molf-ds models` name whose package is not installed: {entry.install}")
    return True


def _missing(value: str) -> str:
    path = Path(value)
    parent = path.parent
    near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1) if parent.is_dir() else []
    hint = f" (did you mean {parent / near[0]}?)" if near else ""
    where = "" if path.is_absolute() else "; relative paths start at the working directory"
    return f"{value} does not exist{hint}{where}"


def _check_gguf(key: str, directory: str, gguf_key: str, gguf_file: str) -> None:
    path = Path(directory)
    if not path.is_dir():
        problem = f"{directory} is a file" if path.exists() else _missing(directory)
        raise SourceError(key, f"{problem}; with {gguf_key} set, {key} is the local directory holding the GGUF file")
    if not (path / gguf_file).is_file() and not Path(gguf_file).is_file():
        near = difflib.get_close_matches(gguf_file, [p.name for p in path.glob("*.gguf")], n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise SourceError(gguf_key, f"{gguf_file} is neither a file in {directory} nor a path to one{hint}")
    if importlib.util.find_spec("gguf") is None:
        raise SourceError(gguf_key, "loading a GGUF checkpoint needs the gguf package: pip install gguf")


# ---- hub ids -------------------------------------------------------------------------------------
def _hub_cached(repo_id: str, files: tuple[str, ...]) -> bool:
    """Whether the hub cache holds one of `files` of the model `repo_id` (its main revision)."""
    from huggingface_hub import try_to_load_from_cache  # deferred: slow to import

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in files)


def _dataset_cached(repo_id: str) -> bool:
    """A dataset `load_dataset` prepared before: offline it reads that, never the hub cache."""
    from datasets import config  # deferred: slow to import
    from datasets.naming import camelcase_to_snakecase

    *owner, name = repo_id.split("/")
    root = Path(config.HF_DATASETS_CACHE) / "___".join([*owner, camelcase_to_snakecase(name)])
    return any(p.is_dir() for p in root.glob("*/*/*"))


def _check_hub(key: str, repo_id: str, repo_type: str, cached: Callable[[str], bool], point: str) -> None:
    """Passes when `cached(repo_id)`, or when the hub is asked and has it (the loader then downloads it)."""
    from huggingface_hub import constants, is_offline_mode  # deferred: slow to import

    if cached(repo_id):
        return
    if repo_type == "dataset":
        from datasets import config

        cache = config.HF_DATASETS_CACHE
    else:
        cache = constants.HF_HUB_CACHE
    head = f"{repo_id!r} is not a local path, and the hub {repo_type} of that id is not in the local cache ({cache})"
    download = (f"download it on a machine with hub access (`hf download {repo_id}"
                f"{' --repo-type dataset' if repo_type == 'dataset' else ''} --local-dir DIR`) and {point}")
    if is_offline_mode():
        raise SourceError(key, f"{head} while HF_HUB_OFFLINE=1: {download}")
    problem = _hub_lookup(repo_id, repo_type)
    if problem == "not found":
        raise SourceError(key, f"{repo_id!r} is not a local path, and the Hugging Face hub has no {repo_type} of that "
                               "id (a private or gated one needs `hf auth login`)")
    if problem is not None:
        raise SourceError(key, f"{head}, and the hub is unreachable ({problem}): {download}; where there is no hub "
                               "access, set HF_HUB_OFFLINE=1")


@functools.lru_cache(maxsize=None)
def _hub_lookup(repo_id: str, repo_type: str) -> str | None:
    """None when the hub has the repository, "not found", or why the hub could not be asked."""
    from huggingface_hub import HfApi, constants  # deferred: slow to import
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError:
        return "not found"
    except Exception as error:  # DNS, refused connection, proxy, timeout, HTTP 5xx: the hub cannot answer
        reason = str(error).splitlines()[0] if str(error) else ""
        return f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    return None


# ---- naming the key ------------------------------------------------------------------------------
def _label(key: str) -> str:
    return f"config key '{key}'" if CONFIG_KEY.fullmatch(key) else f"argument {key}"


def _point(key: str, value: str) -> str:
    """How to give `key` another value: set model.name_or_path=DIR, pass --data FILE, pass DIR as MODEL."""
    if CONFIG_KEY.fullmatch(key):
        return f"set {key}={value}"
    return f"pass {key} {value}" if key.startswith("-") else f"pass {value} as {key}"
