"""Fused C++ CPU kernels (molf_ds/csrc/molf_cpu_adam.cpp), JIT-built on first use.

Inputs must be contiguous fp32 CPU tensors; ``molf_ds.optim.kernels`` checks that.
The kernels use ``torch.get_num_threads()`` OpenMP threads.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "molf_cpu_adam.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-mprefer-vector-width=512"]


def _cpu_tag() -> str:
    """Short hash of the CPU's ISA flags: -march=native builds must not be shared
    between different CPUs through a common extensions cache (e.g. an NFS home)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


@functools.cache
def load() -> bool:
    """Builds and loads the extension once; on failure warns once and returns False."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=f"molf_cpu_adam_{_cpu_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # any toolchain problem: the torch path still works
        warnings.warn(f"molf_ds: C++ CPU kernel unavailable, using the torch path ({exc})", stacklevel=3)
        return False
    return True


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
    return torch.ops.molf_cpu_adam.moments_and_scores(
        grad, exp_avg, exp_avg_sq, beta1, beta2, offsets, lengths, score == "pfn", eps_s
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
    torch.ops.molf_cpu_adam.adamw_update_ranges(
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
    torch.ops.molf_cpu_adam.adamw_step(
        param, grad, exp_avg, exp_avg_sq,
        lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
    )


def moments_and_scores_multi(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    table: torch.Tensor,
    scale: torch.Tensor,
    sums: torch.Tensor,
    took_part: torch.Tensor,
    beta1: float,
    beta2: float,
    score: str,
    eps_s: float = 1e-8,
) -> None:
    torch.ops.molf_cpu_adam.moments_and_scores_multi(
        grads, exp_avgs, exp_avg_sqs, table, scale, sums, took_part, beta1, beta2, score == "pfn", eps_s
    )


def update_winners_multi(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    table: torch.Tensor,
    winners: torch.Tensor,
    lrs: torch.Tensor,
    weight_decays: torch.Tensor,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
) -> int:
    return torch.ops.molf_cpu_adam.update_winners_multi(
        params, exp_avgs, exp_avg_sqs, table, winners, lrs, weight_decays, bias_correction1, bias_correction2, eps
    )


def adamw_step_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
) -> None:
    torch.ops.molf_cpu_adam.adamw_step_multi(
        params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2
    )


def route(
    sums: torch.Tensor, sizes: torch.Tensor, took_part: torch.Tensor, n_experts: int, top_k: int, score: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.molf_cpu_adam.route(sums, sizes, took_part, n_experts, top_k, score == "pfn")


def dropout_zero(x: torch.Tensor, seed: int, keep_prob: float) -> torch.Tensor:
    return torch.ops.molf_cpu_adam.dropout_zero(x, seed, keep_prob)
