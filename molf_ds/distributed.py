"""Ending the process group a command started, before its process exits."""
from __future__ import annotations

import gc

import torch.distributed as dist


def end_process_group() -> None:
    """Destroy the default process group once every rank is done with it. Left to interpreter exit, a rank that
    finishes first tears gloo down on its own, and once in a dozen CI runs such a rank died of SIGABRT
    ("terminate called without an active exception") after its work was done, failing the job."""
    if not dist.is_initialized():
        return
    gc.collect()  # engines, and what they hold of the group, go first
    dist.barrier()
    dist.destroy_process_group()
