"""`molf-ds eval`: a task's metrics for a saved model (sql exact match, med accuracy, fact efficacy...).

MODEL is a transformers model directory (e.g. a run's `final/`), a run's output directory (its `final/` is
used), or a PEFT adapter directory (loaded on its base model). Rows come from a local file or a hub dataset
in the task's own schema, as for `molf-ds train`. Prints one JSON object ({metric: score, ..., "items": n})
and, with --output, writes it. Under torchrun the items are sharded over the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .models import resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory, run output directory (uses final/), PEFT adapter, or a "
                                      "`molf-ds models` name")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside the model directory")
    parser.add_argument("--task", required=True, choices=("sql", "med", "fact", "jsonl", "chat", "alpaca"))
    parser.add_argument("--data", required=True, help="local .json/.jsonl/.parquet/.csv file or hub dataset id")
    parser.add_argument("--split", default="validation", help="hub split [validation]")
    parser.add_argument("--tokenizer", help="tokenizer directory or id [the model's]")
    parser.add_argument("--max-samples", type=int, help="first N rows [all]")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N rows (e.g. the training rows) [0]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation length for sql / jsonl")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output", help="also write the JSON result to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from molf_ds.distributed import end_process_group, report_before_group
    from .sources import SourceError
    from .train.data import DataError

    started_here = _rank() is None  # the group evaluate_model starts under a multi-rank launcher is ended here
    try:
        result = evaluate_model(args.model, args.task, args.data, split=args.split, tokenizer=args.tokenizer,
                                max_samples=args.max_samples, skip=args.skip, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, dtype=args.dtype, gguf_file=args.gguf_file,
                                progress=not args.no_progress)
    except SourceError as error:  # before any process group
        report_before_group(f"molf-ds eval: {error}")
        return 2
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"molf-ds eval: {error}", file=sys.stderr)
        return 2
    if not _rank():
        text = json.dumps(result)
        print(text)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
    if started_here:
        end_process_group()
    return 0


def evaluate_model(
    model: str, task: str, data: str, split: str = "validation", tokenizer: str | None = None,
    max_samples: int | None = None, skip: int = 0, batch_size: int = 16, max_new_tokens: int = 128,
    dtype: str = "float32", gguf_file: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    import torch

    from molf_ds.distributed import init_distributed

    from .train.data import TASKS, DataError, open_table, rows
    from .train.evaluate import evaluate

    if batch_size < 1 or skip < 0 or (max_samples is not None and max_samples < 1):
        raise ValueError("--batch-size and --max-samples must be >= 1, --skip >= 0")
    check_sources(model, data, tokenizer, gguf_file)
    init_distributed(device="cuda" if torch.cuda.is_available() else "cpu", alone=False)  # one process: no group
    module = TASKS[task]
    where, table = open_table(data, split)
    stop = len(table) if max_samples is None else min(len(table), skip + max_samples)
    if skip >= stop:
        raise DataError(f"{where}: {len(table)} rows, none left after --skip {skip}")
    items = [item for row in rows(where, table, range(skip, stop)) for item in module.evals(row)]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    net, tok = load_model(model, tokenizer, dtype, gguf_file)
    net.to(device)
    scores = evaluate(net, tok, items, module.METRICS, batch_size, max_new_tokens, device, progress=progress)
    return {**scores, "items": len(items), "rows": stop - skip}


def check_sources(model: str, data: str, tokenizer: str | None = None, gguf_file: str | None = None) -> None:
    """MODEL (an adapter's base model too; with --gguf-file the folder holding it), its tokenizer and --data can be
    loaded: `SourceError` otherwise."""
    from .sources import SourceError, check_dataset, check_model, check_tokenizer

    own: str | None = None  # where the tokenizer comes from without --tokenizer (None: the GGUF checkpoint)
    if gguf_file is not None:
        check_model("MODEL", model, gguf_file, gguf_key="--gguf-file")
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
    check_dataset("--data", data)


def model_directory(path: str) -> Path:
    """`path`, or the `final/` of a run output directory."""
    directory = Path(path)
    if directory.is_dir() and not (directory / "config.json").exists() and (directory / "final").is_dir():
        return directory / "final"
    return directory


def load_model(path: str, tokenizer: str | None = None, dtype: str = "float32", gguf_file: str | None = None
               ) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory, a run output directory, a PEFT adapter directory, a
    `molf-ds models` name, or a directory and the GGUF checkpoint in it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=getattr(torch, dtype))
        return model, (load_tokenizer(tokenizer) if tokenizer else
                       AutoTokenizer.from_pretrained(path, gguf_file=gguf_file))
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


def load_tokenizer(source: str) -> Any:
    """AutoTokenizer, except for a plain `tokenizers` tokenizer saved beside a model's config.json: transformers
    5 then picks the model type's tokenizer class (e.g. Qwen2Tokenizer) and replaces its pre-tokenizer, so it is
    loaded as the class its tokenizer_config.json names."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(source) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in (
            "TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source)


def _rank() -> int | None:
    """This process's rank; None without a process group."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None
