"""`molf-ds eval`: a task's metrics for a saved model (sql exact match, med accuracy, fact efficacy...).

MODEL is a transformers model directory (e.g. a run's `final/`), a run's output directory (its `final/` is
used), a PEFT adapter directory (loaded on its base model) or a run's checkpoint (`OUT/checkpoints/stepN`). Rows
come from a local file or a hub dataset in the task's own schema, as for `molf-ds train`. Prints one JSON object
({metric: score, ..., "items": n}), alone on stdout, and, with --output FILE, writes it. Under torchrun the items
are sharded over the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from molf_ds.distributed import end_process_group, init_distributed, report_before_group

from .loading import check_model_sources, load_model
from .sources import SourceError, check_dataset
from .train.data import TASKS, DataError, open_table, rows
from .train.evaluate import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory, run output directory (uses final/), PEFT adapter, run "
                                      "checkpoint (OUT/checkpoints/stepN), or a `molf-ds models` name")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside the model directory")
    parser.add_argument("--task", required=True, choices=tuple(TASKS))
    parser.add_argument("--data", required=True, help="local .json/.jsonl/.parquet/.csv file or hub dataset id")
    parser.add_argument("--split", default="validation", help="hub split [validation]")
    parser.add_argument("--tokenizer", help="tokenizer directory or id [the model's]")
    parser.add_argument("--max-samples", type=int, help="first N rows [all]")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N rows (e.g. the training rows) [0]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation length for sql / jsonl")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output", help="also write the JSON result to this file ('-': stdout only, as without it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
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
        if args.output and args.output != "-":
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
    if batch_size < 1 or skip < 0 or (max_samples is not None and max_samples < 1):
        raise ValueError("--batch-size and --max-samples must be >= 1, --skip >= 0")
    check_sources(model, data, tokenizer, gguf_file)
    init_distributed(device="cuda" if torch.cuda.is_available() else "cpu", alone=False)  # one process: no group
    spec = TASKS[task]
    where, table = open_table(data, split)
    stop = len(table) if max_samples is None else min(len(table), skip + max_samples)
    if skip >= stop:
        raise DataError(f"{where}: {len(table)} rows, none left after --skip {skip}")
    items = [item for row in rows(where, table, range(skip, stop)) for item in spec.evals(row)]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    net, tok = load_model(model, tokenizer, dtype, gguf_file)
    net.to(device)
    scores = evaluate(net, tok, items, spec.metrics, batch_size, max_new_tokens, device, progress=progress)
    return {**scores, "items": len(items), "rows": stop - skip}


def check_sources(model: str, data: str, tokenizer: str | None = None, gguf_file: str | None = None) -> None:
    """MODEL (an adapter's base model too; with --gguf-file the folder holding it), its tokenizer and --data can be
    loaded: `SourceError` otherwise."""
    check_model_sources(model, tokenizer, gguf_file)
    check_dataset("--data", data)


def _rank() -> int | None:
    """This process's rank; None without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None
