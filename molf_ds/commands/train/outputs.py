"""What a training run leaves in its output directory besides the logs and checkpoints:
`final/` (merged vanilla transformers model + tokenizer), `final_peft/` (molf-e, lora, adalora), and for
molf and molf-e `routing.png` (molf_ds.commands.plot_routing) and a one-line summary of the routing."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import transformers

from molf_ds.export import export_peft, gathered, save_merged
from molf_ds.optim.routing_log import is_rank_zero
from molf_ds.zero.surface import HF_ZERO3_CONFIG, require
from ..methods import DEGENERATE, REGISTRY, lone_expert
from ..run_dir import FINAL, FINAL_PEFT
from .methods import Trainee


def save_final(trainee: Trainee, tokenizer: Any, out_dir: Path) -> list[Path]:
    """Every rank calls it; rank 0 writes. Returns the directories written."""
    engine, spec = trainee.engine, REGISTRY[trainee.method]
    final, peft_dir = out_dir / FINAL, out_dir / FINAL_PEFT
    written = [final, peft_dir] if spec.exports_peft else [final]
    if spec.molf:
        save_merged(engine, final, tokenizer)
        if spec.exports_peft:
            export_peft(engine, peft_dir)
        return written
    model = engine.module
    # ZeRO-3: every rank gathers the full parameters (the run is over; merging may modify them in place)
    with gathered([p for p in model.parameters() if hasattr(p, "ds_id")]), _zero3_off():
        _save_baseline(model, spec.peft, final, peft_dir, tokenizer)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return written


def _save_baseline(model: Any, peft: bool, final: Path, peft_dir: Path, tokenizer: Any) -> None:
    if is_rank_zero():
        if not peft:
            model.save_pretrained(final)
        else:  # PEFT: the adapter, then the merged model (merging changes the model: the run is over)
            model.save_pretrained(peft_dir)
            model.merge_and_unload().save_pretrained(final)
        tokenizer.save_pretrained(final)


@contextlib.contextmanager
def _zero3_off():
    """transformers' save_pretrained and PEFT's merge treat every parameter as partitioned while a ZeRO-3
    HfDeepSpeedConfig is alive; inside a full gather they must not."""
    from transformers.integrations import deepspeed as hf_deepspeed  # deferred: slow to import

    saved = require(hf_deepspeed, HF_ZERO3_CONFIG, "transformers", transformers.__version__)
    setattr(hf_deepspeed, HF_ZERO3_CONFIG.name, None)
    try:
        yield
    finally:
        setattr(hf_deepspeed, HF_ZERO3_CONFIG.name, saved)


def routing_summary(metrics_path: Path) -> str | None:
    """One line: each expert's share of the routing decisions over the run's steps, and the first expert's
    (`full`, or `lora0` for MoLF-E) share per projection type, then a warning line where one expert took more
    than DEGENERATE of them; None without routed steps."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "routing" in r]
    if not records:
        return None
    experts = list(records[0]["routing"])
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    overall = ", ".join(f"{e} {mean([r['routing'][e] for r in records]):.0%}" for e in experts)
    kinds = records[0].get("routing_by_type", {})
    by_type = ", ".join(f"{k} {mean([r['routing_by_type'][k][experts[0]] for r in records]):.0%}" for k in kinds)
    line = (f"routing over {len(records)} steps: {overall}"
            + (f"; share of '{experts[0]}' per projection type: {by_type}" if by_type else ""))
    winner = lone_expert({e: sum(r["routing"][e] for r in records) for e in experts})
    if winner is not None:
        line += (f"\nwarning: '{winner}' took more than {DEGENERATE:.0%} of the routing decisions, so this run "
                 "trained that expert alone. EPD scores grow with each expert's lr and scaling: compare "
                 "train.lr with train.lora_lr, and molf.lora_alphas / sqrt(molf.lora_ranks) across the experts")
    return line
