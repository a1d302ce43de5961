"""Ending the process group a command started, before its process exits; which rank reports a failure that
every rank meets before there is a group."""
from __future__ import annotations

import gc
import os
import sys
import time

import torch.distributed as dist

LOCAL_RANK_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
PEER_WAIT_S = 30.0  # seconds the other ranks of a node wait to be stopped, see report_before_group


def end_process_group() -> None:
    """Destroy the default process group once every rank is done with it. Left to interpreter exit, a rank that
    finishes first tears gloo down on its own, and once in a dozen CI runs such a rank died of SIGABRT
    ("terminate called without an active exception") after its work was done, failing the job."""
    if not dist.is_initialized():
        return
    gc.collect()  # engines, and what they hold of the group, go first
    dist.barrier()
    dist.destroy_process_group()


def report_before_group(message: str) -> None:
    """Print a failure that every rank meets before the process group starts (a config error, a missing model) once
    per node, not once per rank. The node's first rank under a launcher, or a process without one, prints it at once.
    The others wait up to PEER_WAIT_S for the launcher to stop them when that rank exits (torchrun, deepspeed, mpirun
    and `srun --kill-on-bad-exit` do), and print it only if still running: the failure was then theirs alone, or the
    first rank is far behind. Exiting at once instead, one of them could be the first to go, and the launcher would
    stop the first rank before it said anything."""
    if not _first_on_node():
        time.sleep(PEER_WAIT_S)
    print(message, file=sys.stderr, flush=True)


def _first_on_node() -> bool:
    for name in LOCAL_RANK_ENV:
        if name in os.environ:
            return os.environ[name] == "0"
    return True
