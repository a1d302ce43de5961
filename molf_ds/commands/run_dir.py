"""The layout of a `molf-ds train` output directory OUT, named once for the commands that write it (train's loop,
checkpoints and outputs) and those that read it (loading, compare, examples/replication/report.py)."""
from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"  # the resolved config the run trained with (how loading rebuilds a checkpoint's model)
METRICS = "metrics.jsonl"  # one record per optimizer step: loss, lr, grad norm, routing shares
EVAL = "eval.jsonl"  # one record per evaluation (before, during and after training)
ROUTING = "routing.jsonl"  # MoLF's routing log (molf, molf-e)
ROUTING_PNG = "routing.png"  # the routing log drawn (molf_ds.commands.plot_routing)
FINAL = "final"  # the merged vanilla transformers model and its tokenizer
FINAL_PEFT = "final_peft"  # the PEFT adapter (methods whose Method.exports_peft)
CHECKPOINTS = "checkpoints"  # DeepSpeed checkpoints, one tag directory `stepN` each
COMPLETE = "molf_ds_complete.json"  # in a tag directory: rank 0 writes it once every rank has saved
LOGS = (ROUTING, METRICS, EVAL)  # the append-only logs a resume trims to its step


def of_checkpoint(checkpoint: Path) -> Path:
    """OUT of the checkpoint OUT/checkpoints/stepN."""
    return checkpoint.resolve().parent.parent
