"""Element-wise hot path of the MoLF step.

All functions work in place on flat fp32 tensors of equal size. Segments are given as
two int64 CPU tensors ``offsets`` and ``lengths`` (sorted, non-overlapping).

- ``moments_and_scores``: m, v update over the whole tensor, then per segment the sum of
  q = m^2 / (sqrt(v) + eps_s) ("epd") or (m / (sqrt(v) + eps_s))^2 ("pfn"), as a
  float64 CPU tensor with one value per segment.
- ``adamw_update_ranges``: decoupled weight decay and the Adam update inside the segments.
- ``adamw_step``: plain AdamW over the whole tensor.

Backend: the fused C++ kernel for contiguous fp32 CPU tensors (JIT-built once on first
use), torch otherwise or when the build fails. ``MOLF_DS_KERNEL=torch`` forces torch.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import cpp_impl, torch_impl

__all__ = ["adamw_step", "adamw_update_ranges", "backend", "moments_and_scores"]

ENV_VAR = "MOLF_DS_KERNEL"
SCORES = ("epd", "pfn")


def _forced_torch() -> bool:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in ("", "auto", "torch"):
        raise ValueError(f"{ENV_VAR}={choice!r}: expected 'auto' or 'torch'")
    return choice == "torch"


def _impl(*tensors: torch.Tensor) -> ModuleType:
    cpu_fp32 = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    if cpu_fp32 and not _forced_torch() and cpp_impl.load():
        return cpp_impl
    return torch_impl


def backend(*tensors: torch.Tensor) -> str:
    """Name of the backend ("cpp" or "torch") that would run on these tensors."""
    return "cpp" if _impl(*tensors) is cpp_impl else "torch"


def _check_sizes(tensors: tuple[torch.Tensor, ...]) -> None:
    if any(t.numel() != tensors[0].numel() for t in tensors):
        raise ValueError(f"tensors differ in size: {[t.numel() for t in tensors]}")


def _check_segments(offsets: torch.Tensor, lengths: torch.Tensor, numel: int) -> None:
    if offsets.dtype != torch.int64 or lengths.dtype != torch.int64 or offsets.shape != lengths.shape:
        raise ValueError("offsets and lengths must be int64 tensors of the same shape")
    ends = offsets + lengths
    if offsets.numel() and not (
        (lengths >= 0).all() and offsets[0] >= 0 and (offsets[1:] >= ends[:-1]).all() and ends[-1] <= numel
    ):
        raise ValueError(f"segments must be sorted, non-overlapping and inside [0, {numel})")


def moments_and_scores(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float,
    beta2: float,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    score: str,
    eps_s: float = 1e-8,
) -> torch.Tensor:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    tensors = (grad, exp_avg, exp_avg_sq)
    _check_sizes(tensors)
    _check_segments(offsets, lengths, grad.numel())
    return _impl(*tensors).moments_and_scores(
        grad, exp_avg, exp_avg_sq, beta1, beta2, offsets, lengths, score, eps_s
    )


def adamw_update_ranges(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    lr: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
) -> None:
    tensors = (param, exp_avg, exp_avg_sq)
    _check_sizes(tensors)
    _check_segments(offsets, lengths, param.numel())
    _impl(*tensors).adamw_update_ranges(
        param, exp_avg, exp_avg_sq, offsets, lengths,
        lr, weight_decay, bias_correction1, bias_correction2, eps,
    )


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
) -> None:
    tensors = (param, grad, exp_avg, exp_avg_sq)
    _check_sizes(tensors)
    _impl(*tensors).adamw_step(
        param, grad, exp_avg, exp_avg_sq,
        lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
    )
