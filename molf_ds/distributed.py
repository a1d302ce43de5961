"""Starting the process group from a launcher's environment (`init_distributed`), ending it before the process
exits; which rank reports a failure that every rank meets before there is a group."""
from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import time

import torch.distributed as dist

LOCAL_RANK_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")  # mpirun's, without RANK
WORLD_SIZE_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
PEER_WAIT_S = 30.0  # seconds the other ranks of a node wait to be stopped, see report_before_group


def init_distributed(timeout_s: float | None = None, *, device: str | None = None, alone: bool = True) -> bool:
    """Start the default process group from the launcher's environment: RANK/WORLD_SIZE/MASTER_* (torchrun, deepspeed,
    accelerate, `spawn`), or mpirun's variables through DeepSpeed's MPI discovery. The backend is nccl when `device`
    (default: DeepSpeed's accelerator) is CUDA, gloo on CPU, else the accelerator's own; on a GPU each rank first takes
    the device of its LOCAL_RANK. A collective that waits longer than `timeout_s` (default torch's 30 min) raises
    instead of hanging. Without a launcher the process is a group of one on a free local port, or with
    `alone=False` stays without a group. True when a group exists on return (also one started before)."""
    import deepspeed
    import torch

    if dist.is_initialized():
        return True
    launched = "RANK" in os.environ or any(name in os.environ for name in MPI_ENV)
    if not alone and (not launched or _launched_world_size() <= 1):
        return False
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    accelerator = deepspeed.get_accelerator()
    device = device or accelerator.device_name()
    backend = {"cuda": "nccl", "cpu": "gloo"}.get(device)  # None: DeepSpeed asks the accelerator
    if device != "cpu" and "LOCAL_RANK" in os.environ:  # before the first collective: each rank on its own device
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        else:
            accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, **kwargs)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched_world_size() -> int:
    for name in WORLD_SIZE_ENV:
        if name in os.environ:
            return int(os.environ[name])
    return 2  # PMIX_RANK alone: launched by mpirun, size unknown here


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
