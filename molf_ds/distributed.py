"""Ending the process group a command started, before its process exits; which rank reports a failure that
every rank meets before there is a group."""
from __future__ import annotations

import gc
import os

import torch.distributed as dist

LOCAL_RANK_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


def end_process_group() -> None:
    """Destroy the default process group once every rank is done with it. Left to interpreter exit, a rank that
    finishes first tears gloo down on its own, and once in a dozen CI runs such a rank died of SIGABRT
    ("terminate called without an active exception") after its work was done, failing the job."""
    if not dist.is_initialized():
        return
    gc.collect()  # engines, and what they hold of the group, go first
    dist.barrier()
    dist.destroy_process_group()


def first_on_node() -> bool:
    """Whether this process prints a failure every rank of its node meets before the process group starts (a
    config error, a missing model): the node's first rank under a launcher (torchrun, deepspeed, srun, mpirun),
    so that the line comes once per node, not once per rank; a process without a launcher prints it."""
    for name in LOCAL_RANK_ENV:
        if name in os.environ:
            return os.environ[name] == "0"
    return True
