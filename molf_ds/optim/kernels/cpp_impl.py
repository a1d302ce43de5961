"""Fused C++ CPU kernels (molf_ds/csrc/molf_cpu_adam.cpp), JIT-built on first use.

Inputs must be contiguous fp32 CPU tensors; ``molf_ds.optim.kernels`` checks that.
The kernels use ``torch.get_num_threads()`` OpenMP threads.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ...scores import score_named

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


REQUIRE_ENV = "MOLF_DS_REQUIRE_CPP_KERNEL"
# Measured on the 2-vCPU test VM, one thread (moments, scores and winners' update of 4M elements; 256x1024 dropout).
FALLBACK_COST = "the optimizer's CPU passes run about 5x slower and the experts' CPU dropout about 10x"


@functools.cache
def build_error() -> str | None:
    """Builds and loads the extension once: None when it loaded, else the build's error (compiler output included)."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=f"molf_cpu_adam_{_cpu_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # any toolchain problem: the torch kernels still work
        return str(exc) or repr(exc)
    return None


def cause(error: str) -> str:
    """One line of a build error: its first line up to the command it ran, and the compiler's first error line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    head = lines[0].split(": [", 1)[0]  # "Error building extension 'x': [1/2] c++ ..."
    detail = next((line for line in lines[1:] if "error" in line.lower() and not line.startswith(("FAILED", "ninja"))),
                  None)
    return f"{head}: {detail}" if detail else head


@functools.cache
def load() -> bool:
    """Whether the extension runs here (built on the first call). When it does not: one warning naming the cause
    and the cost, or, with MOLF_DS_REQUIRE_CPP_KERNEL=1 (the test command sets it), a RuntimeError."""
    error = build_error()
    if error is None:
        return True
    if os.environ.get(REQUIRE_ENV) == "1":
        raise RuntimeError(f"molf_ds: the C++ CPU kernel (molf_ds/csrc) failed to build and {REQUIRE_ENV}=1 "
                           f"requires it: install g++ with OpenMP and ninja, or unset {REQUIRE_ENV}. The build said:"
                           f"\n{error}")
    warnings.warn(f"molf_ds: the C++ CPU kernel failed to build ({cause(error)}); using the torch kernels instead: "
                  f"{FALLBACK_COST}. Install g++ with OpenMP and ninja, or set MOLF_DS_KERNEL=torch to choose them "
                  "without this warning", stacklevel=3)
    return False


# The ops take the public functions' arguments in the same order, except that the score name becomes its code
# (molf_ds.scores); every other function of the backend interface is the op itself (see __getattr__).
def moments_and_scores_multi(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                             exp_avg_sqs: list[Tensor], table: Tensor, scale: Tensor, columns: Tensor, sums: Tensor,
                             took_part: Tensor, beta1: float, beta2: float, score: str, eps_s: float) -> None:
    torch.ops.molf_cpu_adam.moments_and_scores_multi(params, grads, exp_avgs, exp_avg_sqs, table, scale, columns,
                                                     sums, took_part, beta1, beta2, score_named(score).code, eps_s)


def moments_scores_speculate_multi(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                                   exp_avg_sqs: list[Tensor], backups: list[Tensor], table: Tensor, scale: Tensor,
                                   columns: Tensor, sums: Tensor, took_part: Tensor, presumed: Tensor, lrs: Tensor,
                                   weight_decays: Tensor, beta1: float, beta2: float, bias_correction1: float,
                                   bias_correction2: float, eps: float, score: str, eps_s: float) -> int:
    return torch.ops.molf_cpu_adam.moments_scores_speculate_multi(
        params, grads, exp_avgs, exp_avg_sqs, backups, table, scale, columns, sums, took_part, presumed, lrs,
        weight_decays, beta1, beta2, bias_correction1, bias_correction2, eps, score_named(score).code, eps_s)


def __getattr__(name: str):
    """update_winners_multi, settle_multi, adamw_step_multi, dropout_zero: the ops as they are (typed and checked
    in molf_ds.optim.kernels, the only caller)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(torch.ops.molf_cpu_adam, name)
