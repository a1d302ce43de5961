"""Run by tests/test_rank_zero_outputs.py under `torchrun --nproc_per_node 2`: the README's "Use it from Python"
snippet as written (a tiny model, the bundled ZeRO-2 preset), with `--init-distributed-first` after
`deepspeed.init_distributed()`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import deepspeed

import molf_ds
from helpers.tiny_models import token_batches
from helpers.zero_runs import MOLF, load

ZERO2 = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--init-distributed-first", action="store_true")
    args = parser.parse_args()
    if args.init_distributed_first:
        deepspeed.init_distributed(dist_backend="gloo")
    model = load(args.model, seed=0)
    cfg = molf_ds.MoLFConfig(**MOLF)
    engine, optimizer, _, _ = molf_ds.initialize(model, cfg, str(ZERO2), routing_log=args.out / "routing.jsonl")
    rank = int(os.environ["RANK"])
    for ids in token_batches(args.steps, 1, 16, seed=rank):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    molf_ds.save_merged(engine, args.out / "final")


if __name__ == "__main__":
    main()
