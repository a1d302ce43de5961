"""Real multi-process runs for tests: spawn ranks on CPU (gloo), count collectives."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing as mp

COLLECTIVES = (
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "_allgather_base",
    "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced",
    "broadcast", "reduce", "gather", "scatter", "alltoall", "alltoall_base", "barrier",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    fn(rank, world, *args)


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes with the env DeepSpeed and torch expect."""
    mp.start_processes(_enter, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")


@contextlib.contextmanager
def count_collectives() -> Iterator[list[str]]:
    """Names of the process-group collectives issued inside the block, whoever issued them."""
    group_class = torch._C._distributed_c10d.ProcessGroup
    calls: list[str] = []
    originals = {name: group_class.__dict__[name] for name in COLLECTIVES if name in group_class.__dict__}

    def counted(name: str, original: Callable) -> Callable:
        def call(self, *args, **kwargs):
            calls.append(name)
            return original.__get__(self)(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(group_class, name, counted(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(group_class, name, original)
