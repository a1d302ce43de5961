"""Run by tests/test_accelerate.py under `accelerate launch --config_file launch/accelerate/<preset>.yaml`:
a few MoLF steps through molf_ds.hf.accelerate_prepare, writing the routing log."""
from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader

import molf_ds
from molf_ds.hf import accelerate_prepare
from helpers.tiny_models import token_batches
from helpers.zero_runs import MOLF, load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--routing-log", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rows = torch.cat(token_batches(args.steps, 2, 16, seed=2))  # global batch 2: one row per rank and step
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    model, optimizer, loader = accelerate_prepare(accelerator, load(args.model, seed=0), molf_ds.MoLFConfig(**MOLF), loader,
                                          routing_log=args.routing_log)
    for ids in loader:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)  # under DeepSpeed this also runs the engine's step
        optimizer.step()
        optimizer.zero_grad()
    accelerator.end_training()  # the process group goes down before interpreter exit, not in a destructor race


if __name__ == "__main__":
    main()
