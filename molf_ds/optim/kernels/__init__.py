"""Element-wise hot path of the MoLF step.

All functions work in place on flat fp32 tensors of equal size. Segments are given as
two int64 CPU tensors ``offsets`` and ``lengths`` (sorted, non-overlapping).

- ``moments_and_scores``: m, v update over the whole tensor, then per segment the sum of
  q = m^2 / (sqrt(v) + eps_s) ("epd") or (m / (sqrt(v) + eps_s))^2 ("pfn"), as a
  float64 CPU tensor with one value per segment.
- ``adamw_update_ranges``: decoupled weight decay and the Adam update inside the segments.
- ``adamw_step``: plain AdamW over the whole tensor.

Multi-tensor forms, one call per param group and step (what MoLFAdamW uses): segments of all tensors
in one int64 table [S, 5] of rows (tensor, offset, length, cell, kind), see ``SegmentTable``.

- ``moments_and_scores_multi``: moments of every tensor; each row's score sum, times ``scale[kind]``,
  goes into a ``ScoreSums`` (float64 per cell; one host transfer per step on non-CPU devices).
- ``update_winners_multi``: the AdamW update inside the rows whose cell won, per-kind lr and decay.
- ``moments_scores_speculate_multi`` / ``settle_multi`` (C++ only, see ``can_speculate``): the same step in one
  pass where the winners are guessed right: rows of presumed winners are updated inside the scoring pass (their
  old values kept in backups); once the winners are known, wrong guesses are restored and missed winners updated.
- ``adamw_step_multi``: plain AdamW over every tensor.
- ``route``: scores per cell from the global sums and the top-k winners per module.
- ``dropout_zero``: the experts' input dropout on CPU (a counter-based mask, kept elements unscaled).

Backend: the fused C++ kernel for contiguous fp32 CPU tensors (JIT-built once on first
use), torch otherwise. A failed build warns once and falls back to torch (an error with
``MOLF_DS_REQUIRE_CPP_KERNEL=1``, as in the test command). ``MOLF_DS_KERNEL=torch`` forces torch.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import cpp_impl, torch_impl

__all__ = [
    "ScoreSums", "SegmentTable", "adamw_step", "adamw_step_multi", "adamw_update_ranges", "backend", "can_speculate",
    "cpp_enabled", "cpp_unavailable", "dropout_zero", "moments_and_scores", "moments_and_scores_multi",
    "moments_scores_speculate_multi", "route", "settle_multi", "update_winners_multi",
]

ENV_VAR = "MOLF_DS_KERNEL"
SCORES = ("epd", "pfn")


def _forced_torch() -> bool:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in ("", "auto", "torch"):
        raise ValueError(f"{ENV_VAR}={choice!r}: expected 'auto' or 'torch'")
    return choice == "torch"


def cpp_enabled() -> bool:
    """Whether the C++ CPU kernels run here (built and not turned off by MOLF_DS_KERNEL=torch)."""
    return not _forced_torch() and cpp_impl.load()


def cpp_unavailable() -> str | None:
    """Why the C++ CPU kernels do not run here (without warning about it), or None when they do."""
    if _forced_torch():
        return f"is turned off by {ENV_VAR}=torch"
    error = cpp_impl.build_error()
    return None if error is None else f"failed to build ({cpp_impl.cause(error)})"


def _impl(*tensors: torch.Tensor) -> ModuleType:
    cpu_fp32 = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    return cpp_impl if cpu_fp32 and cpp_enabled() else torch_impl


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
    """Name of the backend ("cpp" or "torch") that would run on these tensors."""
    return "cpp" if _impl(*tensors) is cpp_impl else "torch"


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")


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
    _check_score(score)
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


# ---- multi-tensor forms ---------------------------------------------------------------------------


class SegmentTable:
    """The segments of a list of flat tensors: rows (tensor, offset, length, cell, kind), checked once here."""

    def __init__(self, rows: list[tuple[int, int, int, int, int]], numels: list[int]) -> None:
        rows = sorted(r for r in rows if r[2] > 0)
        prev_tensor, prev_end = -1, 0
        for tensor, offset, length, _, _ in rows:
            if tensor != prev_tensor:
                prev_end = 0
            if not 0 <= tensor < len(numels) or offset < prev_end or offset + length > numels[tensor]:
                raise ValueError(f"segment ({tensor}, {offset}, {length}) overlaps another or lies outside its tensor")
            prev_tensor, prev_end = tensor, offset + length
        self.rows = rows
        self.table = torch.tensor(rows, dtype=torch.int64).view(-1, 5)
        self.cells = self.table[:, 3].clone()
        self.kinds = self.table[:, 4].clone()
        self.numels = list(numels)
        self.plans: dict = {}  # the torch path's per-device plans (torch_impl.segment_sums_multi)


class ScoreSums:
    """A step's score sums per cell (float64) and which cells took part. The C++ path adds into `sums`
    directly; other devices keep their per-row sums on the device until `totals()`, one transfer per step."""

    def __init__(self, n_cells: int) -> None:
        self.sums = torch.zeros(n_cells, dtype=torch.float64)
        self.took_part = torch.zeros(n_cells, dtype=torch.bool)
        self._pending: list[tuple[torch.Tensor, SegmentTable, torch.Tensor]] = []

    def totals(self) -> torch.Tensor:
        """The sums with every pending row added, in call and row order (deterministic)."""
        if self._pending:
            values = torch.cat([v for v, _, _ in self._pending]).cpu()  # the step's one host sync
            start = 0
            for v, table, scale in self._pending:
                part = values[start : start + v.numel()]
                start += v.numel()
                self.sums.index_add_(0, table.cells, part * scale[table.kinds])
            self._pending.clear()
        return self.sums


def _impl_of(tensors: list[torch.Tensor]) -> ModuleType:
    cpu_fp32 = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    if cpu_fp32 and not _forced_torch() and cpp_impl.load():
        return cpp_impl
    return torch_impl


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
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    segments: SegmentTable,
    scale: torch.Tensor,
    out: ScoreSums,
    beta1: float,
    beta2: float,
    score: str,
    eps_s: float = 1e-8,
) -> None:
    """m, v of every tensor; out.sums[cell] += (score sum of each row) * scale[kind], in row order."""
    _check_score(score)
    _check_batch(segments, grads, exp_avgs, exp_avg_sqs)
    impl = _impl_of([*grads, *exp_avgs, *exp_avg_sqs])
    if impl is cpp_impl:
        cpp_impl.moments_and_scores_multi(grads, exp_avgs, exp_avg_sqs, segments.table, scale, out.sums,
                                          out.took_part, beta1, beta2, score, eps_s)
        return
    values = torch_impl.segment_sums_multi(grads, exp_avgs, exp_avg_sqs, segments, beta1, beta2, score, eps_s)
    out._pending.append((values, segments, scale))
    out.took_part[segments.cells] = True


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
) -> int:
    """AdamW update (lr and decay of the row's kind) inside every row whose cell won; returns the elements updated."""
    _check_batch(segments, params, exp_avgs, exp_avg_sqs)
    return _impl_of([*params, *exp_avgs, *exp_avg_sqs]).update_winners_multi(
        params, exp_avgs, exp_avg_sqs, segments.table, winners, lrs, weight_decays,
        bias_correction1, bias_correction2, eps,
    )


def can_speculate(tensors: list[torch.Tensor]) -> bool:
    """Whether the one-pass speculative step runs on these tensors (the C++ kernel's: contiguous fp32 on CPU)."""
    return _impl_of(tensors) is cpp_impl


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
    eps_s: float = 1e-8,
) -> int:
    """`moments_and_scores_multi`, plus in every row whose cell is `presumed` (bool per cell) to win: backup = p,
    then the AdamW update of p, in the same pass. Returns the elements updated; `settle_multi` finishes the step."""
    _check_score(score)
    _check_batch(segments, grads, params, exp_avgs, exp_avg_sqs, backups)
    if not can_speculate([*params, *grads, *exp_avgs, *exp_avg_sqs, *backups]):
        raise ValueError("the speculative step needs the C++ kernel (contiguous fp32 CPU tensors)")
    return cpp_impl.moments_scores_speculate_multi(
        params, grads, exp_avgs, exp_avg_sqs, backups, segments.table, scale, out.sums, out.took_part, presumed, lrs,
        weight_decays, beta1, beta2, bias_correction1, bias_correction2, eps, score, eps_s)


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
    _impl_of([*params, *grads, *exp_avgs, *exp_avg_sqs]).adamw_step_multi(
        params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2
    )


def route(
    sums: torch.Tensor, sizes: torch.Tensor, took_part: torch.Tensor, n_experts: int, top_k: int, score: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [modules, experts] (float64; sums / max(N_e, 1), square-rooted for PFN, -inf where an expert took
    no part) and the winner mask: per module the top_k scores, ties to the lower index, never a non-participant."""
    _check_score(score)
    sums, sizes, took_part = sums.contiguous(), sizes.double().contiguous().view(-1), took_part.contiguous()
    if sums.numel() != sizes.numel() or sums.numel() != took_part.numel() or sums.numel() % n_experts:
        raise ValueError("sums, sizes and took_part must hold one value per (module, expert)")
    impl = cpp_impl if not _forced_torch() and cpp_impl.load() else torch_impl
    return impl.route(sums, sizes, took_part, n_experts, top_k, score)
