"""Element-wise passes of the MoLF step, over lists of flat tensors (one call per param group and step).

Segments of all tensors of a call are one int64 table [S, 5] of rows (tensor, offset, length, cell, kind), see
``SegmentTable``. What the passes compute is defined in ``molf_ds.optim.routing``; here they run fast.

- ``moments_and_scores_multi``: moments of every tensor; each row's sum of each of the score's channels, times
  ``scale[kind]``, goes into its column of a ``ScoreSums`` (a float64 table [cells, width], on the tensors' device;
  the column by the row's kind, ``ScoreSums.columns``). The parameters are read only by scores that need them.
- ``update_winners_multi``: the AdamW update inside the rows whose cell won, per-kind lr and decay (the Triton
  kernel reads the winner mask on the device; the torch path reads it on the host, one sync per call).
- ``moments_scores_speculate_multi`` / ``settle_multi`` (C++ only, see ``can_speculate``): the same step in one
  pass where the winners are guessed right: rows of presumed winners are updated inside the scoring pass (their
  old values kept in backups); once the winners are known, wrong guesses are restored and missed winners updated.
- ``adamw_step_multi``: plain AdamW over every tensor.
- ``dropout_zero``: the experts' input dropout on CPU (a counter-based mask, kept elements unscaled).

Backend, per call: the fused C++ kernel for contiguous fp32 CPU tensors (JIT-built once on first use), the Triton
kernels (``triton_impl``) for contiguous fp32 CUDA tensors where triton imports, torch otherwise. A failed C++
build warns once and falls back to torch (an error with ``MOLF_DS_REQUIRE_CPP_KERNEL=1``, as in the test command).
``MOLF_DS_KERNEL=torch`` forces torch; ``MOLF_DS_KERNEL=triton`` forces Triton for contiguous fp32 tensors (on CPU
tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how the tests run the Triton kernels).
Score sums and the winner mask stay on the tensors' device: the Triton path makes no host sync.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from ...scores import SCORE_EPS, score_named
from . import cpp_impl, torch_impl
from .torch_impl import to_device

__all__ = [
    "ScoreSums", "SegmentTable", "adamw_step_multi", "backend", "can_speculate", "cpp_enabled", "cpp_unavailable",
    "dropout_zero", "moments_and_scores_multi", "moments_scores_speculate_multi", "settle_multi", "to_device",
    "update_winners_multi",
]

ENV_VAR = "MOLF_DS_KERNEL"
CHOICES = ("auto", "torch", "triton")
INTERPRET_ENV = "TRITON_INTERPRET"


def _choice() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def cpp_enabled() -> bool:
    """Whether the C++ CPU kernels run here (built, and not turned off by MOLF_DS_KERNEL=torch or triton)."""
    return _choice() == "auto" and cpp_impl.load()


def cpp_unavailable() -> str | None:
    """Why the C++ CPU kernels do not run here (without warning about it), or None when they do."""
    choice = _choice()
    if choice != "auto":
        return f"is turned off by {ENV_VAR}={choice}"
    error = cpp_impl.build_error()
    return None if error is None else f"failed to build ({cpp_impl.cause(error)})"


@functools.cache
def _triton() -> ModuleType | None:
    """The Triton kernels, or None where triton does not import (imported on first use: TRITON_INTERPRET is read
    when the kernels are defined)."""
    try:
        from . import triton_impl
    except ImportError:
        return None
    return triton_impl


def _impl(tensors: list[torch.Tensor]) -> ModuleType:
    """The backend for these tensors (see the module's doc)."""
    choice = _choice()
    fp32 = all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    devices = {t.device.type for t in tensors}
    if choice == "triton" and fp32:
        if _triton() is None:
            raise RuntimeError(f"{ENV_VAR}=triton, but triton does not import here: pip install 'molf-ds[triton]'")
        if devices != {"cuda"} and os.environ.get(INTERPRET_ENV) != "1":
            raise RuntimeError(f"{ENV_VAR}=triton on {'/'.join(sorted(devices))} tensors needs Triton's interpreter: "
                               f"set {INTERPRET_ENV}=1 before starting Python (or unset {ENV_VAR})")
        return _triton()
    if choice == "auto" and fp32 and devices == {"cpu"} and cpp_impl.load():
        return cpp_impl
    if choice == "auto" and fp32 and devices == {"cuda"} and _triton() is not None:
        return _triton()
    return torch_impl


def dropout_zero(x: torch.Tensor, p: float) -> torch.Tensor:
    """x (on CPU, C++ kernels enabled) with each element zeroed with probability p, the kept ones NOT rescaled.
    The mask is a hash of (seed, index) with the seed drawn from torch's CPU generator (so torch.manual_seed and
    saved RNG states reproduce it); backward regenerates it instead of storing it. torch's own CPU dropout draws
    from a Mersenne twister at ~5 ns per element, more than the LoRA matmuls it feeds."""
    seed = int(torch.randint(2**62, ()))
    return _ZeroDropped.apply(x, seed, 1.0 - p)


class _ZeroDropped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, keep_prob: float) -> torch.Tensor:
        ctx.seed, ctx.keep_prob = seed, keep_prob
        return cpp_impl.dropout_zero(x.contiguous(), seed, keep_prob)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return cpp_impl.dropout_zero(grad.contiguous(), ctx.seed, ctx.keep_prob), None, None


def backend(*tensors: torch.Tensor) -> str:
    """Name of the backend ("cpp", "triton" or "torch") that would run on these tensors."""
    return _impl(list(tensors)).__name__.rsplit(".", 1)[-1].removesuffix("_impl")


class SegmentTable:
    """The segments of a list of flat tensors: rows (tensor, offset, length, cell, kind), sorted by (tensor, offset),
    checked once here; empty rows are dropped."""

    def __init__(self, rows: list[tuple[int, int, int, int, int]], numels: list[int]) -> None:
        if any(r[2] < 0 for r in rows):
            raise ValueError(f"segments must not have negative lengths: {[r for r in rows if r[2] < 0]}")
        rows = [tuple(r) for r in rows if r[2] > 0]
        prev_tensor, prev_end = -1, 0
        for tensor, offset, length, _, _ in rows:
            in_order = tensor > prev_tensor or (tensor == prev_tensor and offset >= prev_end)
            if not in_order or not 0 <= tensor < len(numels) or offset < 0 or offset + length > numels[tensor]:
                raise ValueError(f"segments must be sorted by (tensor, offset), lie inside their tensors and not "
                                 f"overlap: ({tensor}, {offset}, {length}) does not")
            prev_tensor, prev_end = tensor, offset + length
        self.rows = rows
        self.table = torch.tensor(rows, dtype=torch.int64).view(-1, 5)
        self.cells = self.table[:, 3].clone()
        self.kinds = self.table[:, 4].clone()
        self.numels = list(numels)
        self.plans: dict = {}  # the torch and Triton paths' work per device, built on first use


class ScoreSums:
    """A step's score table [cells, width] (float64) and which cells took part, on the device of the tensors scored
    (the first call's device; the C++ path's CPU). `columns` [kinds, channels] (int64, on the host): the column of
    each channel of a row of each kind (`routing.kind_columns`); None: one channel, one column."""

    def __init__(self, n_cells: int, columns: torch.Tensor | None = None) -> None:
        self.columns = torch.zeros(1, 1, dtype=torch.int64) if columns is None else columns.contiguous()
        width = int(self.columns.max()) + 1
        self.sums = torch.zeros(n_cells, width, dtype=torch.float64)
        self.took_part = torch.zeros(n_cells, dtype=torch.bool)
        self._fresh = True
        self._placed: dict[tuple[int, torch.device], torch.Tensor] = {}

    def kind_columns(self, n_kinds: int, device: torch.device) -> torch.Tensor:
        """`columns` for `n_kinds` kinds (the one-column default repeated) on `device`, checked; copied there once."""
        key = (n_kinds, device)
        if key not in self._placed:
            columns = self.columns.expand(n_kinds, -1).contiguous() if len(self.columns) == 1 else self.columns
            if len(columns) != n_kinds:
                raise ValueError(f"ScoreSums has columns for {len(columns)} kinds, the scale for {n_kinds}")
            self._placed[key] = columns.to(device)
        return self._placed[key]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, took_part) on `device`, to add into."""
        if self.sums.device != device:
            if self._fresh:  # allocated there: no copy
                self.sums = torch.zeros(self.sums.shape, dtype=torch.float64, device=device)
                self.took_part = torch.zeros(self.took_part.shape, dtype=torch.bool, device=device)
            else:
                self.sums, self.took_part = self.sums.to(device), self.took_part.to(device)
        self._fresh = False
        return self.sums, self.took_part

    def totals(self) -> torch.Tensor:
        """The sums, in call and row order (deterministic)."""
        return self.sums


def _check_lists(*lists: list[torch.Tensor]) -> None:
    for tensors in lists[1:]:
        if len(tensors) != len(lists[0]) or any(a.numel() != b.numel() for a, b in zip(tensors, lists[0])):
            raise ValueError("tensor lists differ in length or sizes")


def _check_batch(segments: SegmentTable, *lists: list[torch.Tensor]) -> None:
    """Lists of equal tensors, and the segment table built for them."""
    _check_lists(*lists)
    if [t.numel() for t in lists[0]] != segments.numels:
        raise ValueError("the segment table was built for tensors of other sizes")


def moments_and_scores_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    segments: SegmentTable,
    scale: torch.Tensor,
    out: ScoreSums,
    beta1: float,
    beta2: float,
    score: str,
    eps_s: float = SCORE_EPS,
) -> None:
    """m, v of every tensor; out.sums[cell, column] += (sum of each channel of each row) * scale[kind], in row
    order (`params`, before the step, read where the score needs them)."""
    _check_batch(segments, params, grads, exp_avgs, exp_avg_sqs)
    impl = _impl([*params, *grads, *exp_avgs, *exp_avg_sqs])
    sums, took_part = out.on(grads[0].device if grads and impl is not cpp_impl else torch.device("cpu"))
    columns = _columns(score, out, scale, sums.device)
    if impl is cpp_impl:
        cpp_impl.moments_and_scores_multi(params, grads, exp_avgs, exp_avg_sqs, segments.table, scale, columns, sums,
                                          took_part, beta1, beta2, score, eps_s)
    elif impl is torch_impl:
        values = torch_impl.segment_sums_multi(params, grads, exp_avgs, exp_avg_sqs, segments, beta1, beta2, score,
                                               eps_s)
        torch_impl.add_row_sums(sums, took_part, values, segments, scale, columns)
    else:
        impl.moments_and_scores_multi(params, grads, exp_avgs, exp_avg_sqs, segments, scale, columns, sums,
                                      took_part, beta1, beta2, score, eps_s)


def _columns(score: str, out: ScoreSums, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """out's columns per kind on `device`, checked against the score's channels."""
    columns = out.kind_columns(scale.numel(), device)
    n_channels = score_named(score).n_channels
    if columns.shape[1] != n_channels:
        raise ValueError(f"score {score!r} sums {n_channels} channels per element: ScoreSums needs as many columns "
                         f"per kind, has {columns.shape[1]} (build it with routing.kind_columns({score!r}))")
    return columns


def update_winners_multi(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    segments: SegmentTable,
    winners: torch.Tensor,
    lrs: torch.Tensor,
    weight_decays: torch.Tensor,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
) -> int | torch.Tensor:
    """AdamW update (lr and decay of the row's kind) inside every row whose cell won; returns the elements updated
    (on the Triton path a 0-dim tensor on the device: reading it is a host sync)."""
    _check_batch(segments, params, exp_avgs, exp_avg_sqs)
    impl = _impl([*params, *exp_avgs, *exp_avg_sqs])
    return impl.update_winners_multi(params, exp_avgs, exp_avg_sqs, segments if impl is _triton() else segments.table,
                                     winners, lrs, weight_decays, bias_correction1, bias_correction2, eps)


def can_speculate(tensors: list[torch.Tensor]) -> bool:
    """Whether the one-pass speculative step runs on these tensors (the C++ kernel's: contiguous fp32 on CPU)."""
    return _impl(tensors) is cpp_impl


def moments_scores_speculate_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    backups: list[torch.Tensor],
    segments: SegmentTable,
    scale: torch.Tensor,
    out: ScoreSums,
    presumed: torch.Tensor,
    lrs: torch.Tensor,
    weight_decays: torch.Tensor,
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    score: str,
    eps_s: float = SCORE_EPS,
) -> int:
    """`moments_and_scores_multi`, plus in every row whose cell is `presumed` (bool per cell) to win: backup = p,
    then the AdamW update of p, in the same pass. Returns the elements updated; `settle_multi` finishes the step."""
    columns = _columns(score, out, scale, torch.device("cpu"))
    _check_batch(segments, grads, params, exp_avgs, exp_avg_sqs, backups)
    if not can_speculate([*params, *grads, *exp_avgs, *exp_avg_sqs, *backups]):
        raise ValueError("the speculative step needs the C++ kernel (contiguous fp32 CPU tensors)")
    return cpp_impl.moments_scores_speculate_multi(
        params, grads, exp_avgs, exp_avg_sqs, backups, segments.table, scale, columns, out.sums, out.took_part,
        presumed, lrs, weight_decays, beta1, beta2, bias_correction1, bias_correction2, eps, score, eps_s)


def settle_multi(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    backups: list[torch.Tensor],
    segments: SegmentTable,
    presumed: torch.Tensor,
    winners: torch.Tensor,
    lrs: torch.Tensor,
    weight_decays: torch.Tensor,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
) -> tuple[int, int]:
    """After `moments_scores_speculate_multi`: rows presumed to win that lost get their backup back; rows that won
    unpresumed get the AdamW update. Returns (elements updated, elements restored)."""
    _check_batch(segments, params, exp_avgs, exp_avg_sqs, backups)
    return cpp_impl.settle_multi(params, exp_avgs, exp_avg_sqs, backups, segments.table, presumed, winners, lrs,
                                 weight_decays, bias_correction1, bias_correction2, eps)


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
    _check_lists(params, grads, exp_avgs, exp_avg_sqs)
    _impl([*params, *grads, *exp_avgs, *exp_avg_sqs]).adamw_step_multi(
        params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2
    )

