"""Run by tests/test_accelerate.py under `accelerate launch --config_file launch/accelerate/<preset>.yaml`:
a few MoLF steps through molf_ds.hf.accelerate_prepare, writing the routing log."""
from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader

import molf_ds
from molf_ds.distributed import end_process_group
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
    # The engine goes first (free_memory destroys it), then the group once every rank is done with it: left to
    # end_training, a ZeRO-3 rank once in a few CI runs died of SIGABRT in gloo's teardown after its work was done.
    accelerator.free_memory(model, optimizer, loader)
    del model, optimizer, loader
    end_process_group()


if __name__ == "__main__":
    main()
