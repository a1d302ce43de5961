"""Real multi-process runs: `spawn(fn, world, *args)` starts `world` ranks with the environment DeepSpeed and
torch.distributed expect (one OpenMP thread each on CPU), plus any variables the children must see before they
import torch; the process group fn starts is ended when it returns."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from molf_ds.distributed import end_process_group, free_port


def _enter(rank: int, world: int, port: int, threads: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    fn(rank, world, *args)
    end_process_group()  # the one fn started, if any


def spawn(fn: Callable[..., None], world: int, *args: Any, threads: int = 1, env: dict[str, str] | None = None) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes (start method "spawn"), `threads` threads each; `env`
    is set in the children from their start (OpenMP and torch read theirs when loaded, before _enter runs)."""
    child_env = {**(env or {}), "OMP_NUM_THREADS": str(threads)}
    before = {name: os.environ.get(name) for name in child_env}
    os.environ.update(child_env)
    try:
        mp.start_processes(_enter, args=(world, free_port(), threads, fn, args), nprocs=world, start_method="spawn")
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
