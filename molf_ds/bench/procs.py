"""Real multi-process runs: `spawn(fn, world, *args)` starts `world` ranks with the environment DeepSpeed and
torch.distributed expect (one OpenMP thread each on CPU)."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(rank: int, world: int, port: int, threads: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    fn(rank, world, *args)


def spawn(fn: Callable[..., None], world: int, *args: Any, threads: int = 1) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes (start method "spawn"), `threads` threads each."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by OpenMP when a child loads torch, before _enter runs
    try:
        mp.start_processes(_enter, args=(world, free_port(), threads, fn, args), nprocs=world, start_method="spawn")
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before
