"""Count the collectives a block of code issues, at the ProcessGroup level (whoever issues them: DeepSpeed,
torch.distributed, MoLF), with the bytes each one carries.

The bytes of a call are the bytes of the tensors this rank contributes: the input of all-gather,
reduce-scatter, gather and all-to-all; the (in-place) tensors of all-reduce, broadcast and reduce."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

COLLECTIVES = (
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "_allgather_base",
    "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced",
    "broadcast", "reduce", "gather", "scatter", "alltoall", "alltoall_base", "barrier", "monitored_barrier",
    # torch >= 2.13: what torch.distributed.all_gather_into_tensor / reduce_scatter_tensor / all_to_all_single
    # call (DeepSpeed's ZeRO gathers and reduce-scatters go through these)
    "all_gather_single", "all_gather_single_coalesced", "reduce_scatter_single", "reduce_scatter_single_coalesced",
    "all_to_all_single",
)
# Position of the argument holding this rank's contribution; the others carry it in argument 0.
_INPUT_ARG = {
    "allgather": 1, "allgather_coalesced": 1, "_allgather_base": 1, "allgather_into_tensor_coalesced": 1,
    "reduce_scatter": 1, "_reduce_scatter_base": 1, "reduce_scatter_tensor_coalesced": 1, "gather": 1,
    "alltoall": 1, "alltoall_base": 1, "all_gather_single": 1, "all_gather_single_coalesced": 1,
    "reduce_scatter_single": 1, "reduce_scatter_single_coalesced": 1, "all_to_all_single": 1,
}


class CollectiveLog(list):
    """The names of the collectives issued, in order (a plain list of str), plus `sizes`: bytes of each."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def add(self, name: str, nbytes: int) -> None:
        self.append(name)
        self.sizes.append(nbytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def since(self, start: int) -> list[tuple[str, int]]:
        """(name, bytes) of the calls from position `start` on."""
        return list(zip(self[start:], self.sizes[start:]))


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) list or tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def payload_bytes(name: str, args: tuple) -> int:
    position = _INPUT_ARG.get(name, 0)
    return tensor_bytes(args[position]) if len(args) > position else 0


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """The process-group collectives issued inside the block, whoever issued them: a list of their names
    (with `.sizes`, the bytes of each)."""
    group_class = torch._C._distributed_c10d.ProcessGroup
    calls = CollectiveLog()
    originals = {name: group_class.__dict__[name] for name in COLLECTIVES if name in group_class.__dict__}

    def counted(name: str, original: Callable) -> Callable:
        def call(self, *args, **kwargs):
            calls.add(name, payload_bytes(name, args))
            return original.__get__(self)(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(group_class, name, counted(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(group_class, name, original)
