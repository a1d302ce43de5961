"""What a training run leaves in its output directory besides the logs and checkpoints:
`final/` (merged vanilla transformers model + tokenizer), `final_peft/` (molf-e, lora, adalora) and
`routing.png` (molf, molf-e)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..export import export_peft, gathered, save_merged
from ..optim.routing_log import is_rank_zero
from .methods import Trainee

FINAL, FINAL_PEFT, ROUTING_PNG = "final", "final_peft", "routing.png"


def save_final(trainee: Trainee, tokenizer: Any, out_dir: Path) -> list[Path]:
    """Every rank calls it; rank 0 writes. Returns the directories written."""
    engine, method = trainee.engine, trainee.method
    final, peft_dir = out_dir / FINAL, out_dir / FINAL_PEFT
    if trainee.is_molf:
        save_merged(engine, final, tokenizer)
        if method == "molf-e":
            export_peft(engine, peft_dir)
            return [final, peft_dir]
        return [final]
    model = engine.module
    # ZeRO-3: every rank gathers the full parameters (the run is over; merging may modify them in place)
    with gathered([p for p in model.parameters() if hasattr(p, "ds_id")]), _zero3_off():
        _save_baseline(model, method, final, peft_dir, tokenizer)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return [final] if method == "fft" else [final, peft_dir]


def _save_baseline(model: Any, method: str, final: Path, peft_dir: Path, tokenizer: Any) -> None:
    if is_rank_zero():
        if method == "fft":
            model.save_pretrained(final)
        else:  # PEFT: the adapter, then the merged model (merging changes the model: the run is over)
            model.save_pretrained(peft_dir)
            model.merge_and_unload().save_pretrained(final)
        tokenizer.save_pretrained(final)


@contextlib.contextmanager
def _zero3_off():
    """transformers' save_pretrained and PEFT's merge treat every parameter as partitioned while a ZeRO-3
    HfDeepSpeedConfig is alive; inside a full gather they must not."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def plot_routing(metrics_path: Path, png_path: Path) -> Path:
    """Share of MoLF modules routed to each expert, step by step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "routing" in r]
    steps = [r["step"] for r in records]
    experts = list(records[0]["routing"]) if records else []
    figure, axes = plt.subplots(figsize=(8, 4))
    for expert in experts:
        axes.plot(steps, [r["routing"][expert] for r in records], label=expert, linewidth=1.2)
    axes.set(xlabel="optimizer step", ylabel="share of modules routed", ylim=(-0.02, 1.02),
             title="MoLF routing: which expert each module's update went to")
    axes.grid(alpha=0.3)
    if experts:
        axes.legend(title="expert")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path
