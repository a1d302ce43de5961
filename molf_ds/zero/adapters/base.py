"""What the adapters share: a LayoutSource over DeepSpeed's flat tensors, the score all-reduce, the step hook."""
from __future__ import annotations

import os
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch

from ...optim import MoLFAdamW
from ...optim.layout import Layout
from ...optim.routing import ScoreReducer


class TensorLayouts:
    """LayoutSource over a fixed {id(tensor): Layout} map; an unknown tensor is a bug, said plainly."""

    def __init__(self, layouts: dict[int, Layout]) -> None:
        self.layouts = layouts

    def __call__(self, flat: torch.Tensor) -> Layout:
        try:
            return self.layouts[id(flat)]
        except KeyError:
            raise RuntimeError(
                f"MoLF: DeepSpeed handed the optimizer a tensor of shape {tuple(flat.shape)} that no layout "
                "covers; this DeepSpeed optimizer wrapper is not supported by molf_ds"
            ) from None


def all_reduce_over(group: Any) -> ScoreReducer:
    """The routing all-reduce. On CPU the rank polls for it (yielding its core) instead of blocking: a blocked
    rank's core goes idle and wakes late, which cost 17 ms of a 62 ms optimizer step on the 2-vCPU test VM."""
    device = torch.device(deepspeed.get_accelerator().current_device_name())

    def reduce(sums: torch.Tensor) -> None:
        on_device = sums if sums.device.type == device.type else sums.to(device)  # the Triton path's: already there
        work = dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group, async_op=True)
        if on_device.device.type == "cpu":
            while not work.is_completed():
                os.sched_yield()
        work.wait()
        if on_device is not sums:
            sums.copy_(on_device)

    return reduce


def one_step_per_call(wrapper: Any, optimizer: MoLFAdamW) -> None:
    """One wrapper step is one MoLF step, however many inner calls it makes; a step DeepSpeed skipped
    (fp16 overflow, inf/NaN grads) is recorded in the routing log."""
    inner_step = wrapper.step

    def step(*args: Any, **kwargs: Any) -> Any:
        before = optimizer.molf_step
        with optimizer.grouped_step():
            result = inner_step(*args, **kwargs)
        if optimizer.molf_step == before:
            optimizer.record_skipped_step()
        return result

    wrapper.step = step
