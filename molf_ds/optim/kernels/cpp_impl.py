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
from torch import Tensor

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


# The ops take the public functions' arguments in the same order, except that the score name ("epd" / "pfn")
# becomes a flag; every other function of the backend interface is the op itself (see __getattr__).
def moments_and_scores(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, offsets: Tensor,
                       lengths: Tensor, score: str, eps_s: float = 1e-8) -> Tensor:
    return torch.ops.molf_cpu_adam.moments_and_scores(
        grad, exp_avg, exp_avg_sq, beta1, beta2, offsets, lengths, score == "pfn", eps_s)


def moments_and_scores_multi(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], table: Tensor,
                             scale: Tensor, sums: Tensor, took_part: Tensor, beta1: float, beta2: float, score: str,
                             eps_s: float = 1e-8) -> None:
    torch.ops.molf_cpu_adam.moments_and_scores_multi(
        grads, exp_avgs, exp_avg_sqs, table, scale, sums, took_part, beta1, beta2, score == "pfn", eps_s)


def moments_scores_speculate_multi(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                                   exp_avg_sqs: list[Tensor], backups: list[Tensor], table: Tensor, scale: Tensor,
                                   sums: Tensor, took_part: Tensor, presumed: Tensor, lrs: Tensor,
                                   weight_decays: Tensor, beta1: float, beta2: float, bias_correction1: float,
                                   bias_correction2: float, eps: float, score: str, eps_s: float = 1e-8) -> int:
    return torch.ops.molf_cpu_adam.moments_scores_speculate_multi(
        params, grads, exp_avgs, exp_avg_sqs, backups, table, scale, sums, took_part, presumed, lrs, weight_decays,
        beta1, beta2, bias_correction1, bias_correction2, eps, score == "pfn", eps_s)


def route(sums: Tensor, sizes: Tensor, took_part: Tensor, n_experts: int, top_k: int, score: str
          ) -> tuple[Tensor, Tensor]:
    return torch.ops.molf_cpu_adam.route(sums, sizes, took_part, n_experts, top_k, score == "pfn")


def __getattr__(name: str):
    """adamw_update_ranges, adamw_step, update_winners_multi, settle_multi, adamw_step_multi, dropout_zero: the
    ops as they are (typed and checked in molf_ds.optim.kernels, the only caller)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(torch.ops.molf_cpu_adam, name)
