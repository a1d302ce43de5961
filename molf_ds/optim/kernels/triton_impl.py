"""Triton kernels of the MoLF step (CUDA; CPU tensors under TRITON_INTERPRET=1, which is how the tests run them).

Each call covers all tensors of a param group in a fixed number of launches, however many tensors and modules:
the tensors are reached through a table of their addresses, and the work is a table of blocks (tensor, start, end,
row), cut at segment boundaries and on a grid of ``BLOCK`` elements of each tensor, built once per
``SegmentTable`` and device (``_Plan``).

- ``_moments_scores``: one program per block: m, v of every element; in a segment's block, each of the score's
  channels summed in float64 into the block's partial sums (20 bytes per element: g, m, v read, m, v written; LDW
  also reads p).
- ``_cell_sums``: one program per cell of the table: its rows' partial sums in block order, times scale[kind],
  added to the cell's columns in row order (deterministic: no atomics, the same order whatever the scheduling).
- ``_update``: one program per block of a segment; a block whose cell lost (read on the device) exits at once;
  the others take the AdamW update with their kind's lr and decay (16 bytes per winning element).
- ``_adamw``: plain AdamW (28 bytes per element); on CUDA torch's fused AdamW runs instead where it applies.

Nothing here copies device data to the host: small host tensors (addresses, per-kind constants) go to the device
from pinned memory without blocking. Arithmetic follows the torch path (IEEE sqrt and division).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...scores import score_named
from .torch_impl import to_device

BLOCK = 4096  # elements per program
REDUCE_BLOCK = 1024  # partial sums read at once by _cell_sums


@triton.jit
def _tensor(ptrs, n_tensors, t, k):
    """Tensor t of the k-th list in the address table, as an fp32 pointer."""
    return tl.load(ptrs + k * n_tensors + t).to(tl.pointer_type(tl.float32))


@triton.jit
def _adam_update(p, m, v, decay, step, sqrt_bc2, eps):
    """p after the AdamW update: decoupled decay, then the bias-corrected step, as torch_impl's _update_ranges."""
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    return p * decay + step * tl.div_rn(m, denom)


@triton.jit
def _new_moments(g, m, v, w1, beta2, w2, SMALL_W1: tl.constexpr):
    """m and v after one step, as torch's lerp_ and mul_/addcmul_ compute them."""
    d = g - m
    if SMALL_W1:  # torch's lerp: the branch on the weight
        m = tl.fma(w1, d, m)
    else:
        m = tl.fma(-d, 1.0 - w1, g)
    return m, v * beta2 + w2 * g * g


@triton.jit
def _channel_sum(q, mask):
    return tl.sum(tl.where(mask, q, 0.0).to(tl.float64), axis=0)


@triton.jit
def _moments_scores(ptrs, n_tensors, blocks, partials, w1, beta2, w2, eps_s, SMALL_W1: tl.constexpr,
                    SCORE: tl.constexpr, CHANNELS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blocks + pid * 4)
    start = tl.load(blocks + pid * 4 + 1)
    end = tl.load(blocks + pid * 4 + 2)
    row = tl.load(blocks + pid * 4 + 3)
    g_ptr = _tensor(ptrs, n_tensors, t, 0)
    m_ptr = _tensor(ptrs, n_tensors, t, 1)
    v_ptr = _tensor(ptrs, n_tensors, t, 2)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m, v = _new_moments(g, m, v, w1, beta2, w2, SMALL_W1)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if row >= 0:  # molf_ds.scores' channels, into partials[block, channel]
        denom = tl.sqrt_rn(v) + eps_s
        if SCORE == 0:  # EPD: m^2 / (sqrt(v) + eps_s)
            tl.store(partials + pid, _channel_sum(tl.div_rn(m * m, denom), mask))
        elif SCORE == 1:  # PFN: (m / (sqrt(v) + eps_s))^2
            r = tl.div_rn(m, denom)
            tl.store(partials + pid, _channel_sum(r * r, mask))
        else:  # LDW: u = m / (sqrt(v) + eps_s); m*u, u^2, p^2 (p before the step)
            p = tl.load(_tensor(ptrs, n_tensors, t, 3) + offs, mask=mask, other=0.0)
            u = tl.div_rn(m, denom)
            tl.store(partials + pid * CHANNELS, _channel_sum(m * u, mask))
            tl.store(partials + pid * CHANNELS + 1, _channel_sum(u * u, mask))
            tl.store(partials + pid * CHANNELS + 2, _channel_sum(p * p, mask))


@triton.jit
def _cell_sums(cells, cell_rows, rows, row_blocks, row_kinds, partials, scale, columns, sums, took_part, width,
               CHANNELS: tl.constexpr, WIDTH: tl.constexpr, REDUCE_BLOCK: tl.constexpr):
    """The cell's row of the table held as WIDTH (a power of two >= width) lanes: each channel's row sum lands in
    its column, the other lanes add an exact 0."""
    pid = tl.program_id(0)
    cell = tl.load(cells + pid)
    lanes = tl.arange(0, WIDTH)
    total = tl.load(sums + cell * width + lanes, mask=lanes < width, other=0.0)
    for i in range(tl.load(cell_rows + pid), tl.load(cell_rows + pid + 1)):
        row = tl.load(rows + i)
        first = tl.load(row_blocks + 2 * row)
        last = tl.load(row_blocks + 2 * row + 1)
        kind = tl.load(row_kinds + row)
        factor = tl.load(scale + kind)
        for c in tl.static_range(CHANNELS):
            acc = tl.zeros([], dtype=tl.float64)
            for j in range(first, last, REDUCE_BLOCK):
                offs = j + tl.arange(0, REDUCE_BLOCK)
                acc += tl.sum(tl.load(partials + offs * CHANNELS + c, mask=offs < last, other=0.0), axis=0)
            column = tl.load(columns + kind * CHANNELS + c)
            total = total + tl.where(lanes == column, acc * factor, 0.0)
    tl.store(sums + cell * width + lanes, total, mask=lanes < width)
    tl.store(took_part + cell, 1)


@triton.jit
def _update(ptrs, n_tensors, blocks, winners, coefs, sqrt_bc2, eps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cell = tl.load(blocks + pid * 5 + 3)
    if tl.load(winners + cell) == 0:  # the cell lost: nothing to do
        return
    t = tl.load(blocks + pid * 5)
    start = tl.load(blocks + pid * 5 + 1)
    end = tl.load(blocks + pid * 5 + 2)
    kind = tl.load(blocks + pid * 5 + 4)
    decay = tl.load(coefs + 2 * kind)
    step = tl.load(coefs + 2 * kind + 1)
    p_ptr = _tensor(ptrs, n_tensors, t, 0)
    m_ptr = _tensor(ptrs, n_tensors, t, 1)
    v_ptr = _tensor(ptrs, n_tensors, t, 2)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    tl.store(p_ptr + offs, _adam_update(p, m, v, decay, step, sqrt_bc2, eps), mask=mask)


@triton.jit
def _adamw(ptrs, n_tensors, blocks, w1, beta2, w2, decay, step, sqrt_bc2, eps, SMALL_W1: tl.constexpr,
           BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blocks + pid * 3)
    start = tl.load(blocks + pid * 3 + 1)
    end = tl.load(blocks + pid * 3 + 2)
    p_ptr = _tensor(ptrs, n_tensors, t, 0)
    g_ptr = _tensor(ptrs, n_tensors, t, 1)
    m_ptr = _tensor(ptrs, n_tensors, t, 2)
    v_ptr = _tensor(ptrs, n_tensors, t, 3)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < end
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m, v = _new_moments(g, m, v, w1, beta2, w2, SMALL_W1)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, _adam_update(p, m, v, decay, step, sqrt_bc2, eps), mask=mask)


# ---- work tables (host side, built once per segment table and device) ------------------------------------------
def _blocks(tensor: Tensor, start: Tensor, end: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pieces [start, end) of tensors cut on each tensor's grid of `block` elements: (piece, tensor, start, end)
    per block, in piece order."""
    if not len(start):
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty, empty
    first, last = start // block, (end - 1) // block
    counts = last - first + 1
    piece = torch.repeat_interleave(torch.arange(len(start)), counts)
    k = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    grid = (first[piece] + k) * block
    return piece, tensor[piece], torch.maximum(start[piece], grid), torch.minimum(end[piece], grid + block)


def _with_gaps(rows: list[tuple[int, ...]], numels: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every element of every tensor as pieces (tensor, start, end, row), row -1 between segments."""
    pieces, r = [], 0
    for t, numel in enumerate(numels):
        pos = 0
        while r < len(rows) and rows[r][0] == t:
            _, offset, length = rows[r][:3]
            if offset > pos:
                pieces.append((t, pos, offset, -1))
            pieces.append((t, offset, offset + length, r))
            pos, r = offset + length, r + 1
        if numel > pos:
            pieces.append((t, pos, numel, -1))
    return tuple(torch.tensor([p[i] for p in pieces], dtype=torch.int64) for i in range(4))


class _Plan:
    """A SegmentTable's work on one device: the scoring pass's blocks (every element), each row's range of them,
    the cells with their rows (row order), and the update's blocks (segments only, with cell and kind)."""

    def __init__(self, rows: list[tuple[int, ...]], numels: list[int], device: torch.device, block: int) -> None:
        table = torch.tensor(rows, dtype=torch.int64).view(-1, 5)
        tensor, start, end, row = _with_gaps(rows, numels)
        piece, *spans = _blocks(tensor, start, end, block)
        block_rows = row[piece]
        self.n_blocks = len(piece)
        self.blocks = torch.stack([*spans, block_rows], dim=1).to(device)
        per_row = torch.bincount(block_rows[block_rows >= 0], minlength=len(rows))
        ends = torch.nonzero(block_rows >= 0).view(-1)[torch.cumsum(per_row, 0) - 1] + 1  # a row's blocks: adjacent
        row_blocks = torch.stack([ends - per_row, ends], dim=1)  # [first, end) per row
        cell_order = torch.sort(table[:, 3], stable=True)
        cells, counts = torch.unique_consecutive(cell_order.values, return_counts=True)
        self.n_cells = len(cells)
        self.cells = cells.to(device)
        self.cell_rows = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)]).to(device)
        self.rows = cell_order.indices.to(device)
        self.row_blocks = row_blocks.to(device)
        self.row_kinds = table[:, 4].contiguous().to(device)
        piece, *spans = _blocks(table[:, 0], table[:, 1], table[:, 1] + table[:, 2], block)
        self.n_update_blocks = len(piece)
        self.update_blocks = torch.stack([*spans, table[piece, 3], table[piece, 4]], dim=1).to(device)
        self.row_cells, self.row_lengths = table[:, 3].to(device), table[:, 2].to(device)


def _plan(segments, device: torch.device) -> _Plan:
    key = ("triton", device, BLOCK)
    plan = segments.plans.get(key)
    if plan is None:
        plan = segments.plans[key] = _Plan(segments.rows, segments.numels, device, BLOCK)
    return plan


class _Addresses:
    """The device table of the tensors' addresses [lists x tensors], rebuilt only when an address changes (DeepSpeed's
    flat partitions keep theirs; a model's own gradients may move between steps)."""

    def __init__(self) -> None:
        self._last: tuple[tuple[int, ...], Tensor] | None = None

    def __call__(self, *lists: list[Tensor]) -> Tensor:
        key = tuple(t.data_ptr() for ts in lists for t in ts)
        if self._last is None or self._last[0] != key:
            self._last = key, to_device(torch.tensor(key, dtype=torch.int64), lists[0][0].device)
        return self._last[1]


def _pointer_table(name: str, segments, *lists: list[Tensor]) -> Tensor:
    """The address table of `lists` for pass `name`, cached per segment table."""
    cache = segments.plans.setdefault(("triton-addresses", name), _Addresses())
    return cache(*lists)


def _moments(beta1: float, beta2: float) -> tuple[float, float, float, bool]:
    """(w1, beta2, w2, small_w1) as the C++ kernel's `Moments`; Triton rounds the floats to fp32."""
    return 1.0 - beta1, beta2, 1.0 - beta2, abs(1.0 - beta1) < 0.5


# ---- the backend interface ------------------------------------------------------------------------------------
def moments_and_scores_multi(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                             exp_avg_sqs: list[Tensor], segments, scale: Tensor, columns: Tensor, sums: Tensor,
                             took_part: Tensor, beta1: float, beta2: float, score: str, eps_s: float) -> None:
    """m, v of every tensor; sums[cell, columns[kind, c]] += each row's sum of channel c times scale[kind] in row
    order; took_part set. `sums` [cells, width] and `took_part` live on the tensors' device."""
    device = grads[0].device
    plan = _plan(segments, device)
    if not plan.n_blocks:
        return
    row = score_named(score)
    lists = (grads, exp_avgs, exp_avg_sqs, params) if row.needs_params else (grads, exp_avgs, exp_avg_sqs)
    ptrs = _pointer_table(f"moments-{len(lists)}", segments, *lists)
    partials = torch.empty(plan.n_blocks * row.n_channels, dtype=torch.float64, device=device)
    w1, b2, w2, small_w1 = _moments(beta1, beta2)
    _moments_scores[(plan.n_blocks,)](ptrs, len(grads), plan.blocks, partials, w1, b2, w2, eps_s,
                                      SMALL_W1=small_w1, SCORE=row.code, CHANNELS=row.n_channels, BLOCK=BLOCK,
                                      num_warps=8)
    if plan.n_cells:
        width = sums.shape[1]
        _cell_sums[(plan.n_cells,)](plan.cells, plan.cell_rows, plan.rows, plan.row_blocks, plan.row_kinds, partials,
                                    to_device(scale, device), to_device(columns, device), sums,
                                    took_part.view(torch.uint8), width, CHANNELS=row.n_channels,
                                    WIDTH=triton.next_power_of_2(width), REDUCE_BLOCK=REDUCE_BLOCK)


def update_winners_multi(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], segments,
                         winners: Tensor, lrs: Tensor, weight_decays: Tensor, bias_correction1: float,
                         bias_correction2: float, eps: float) -> Tensor:
    """The AdamW update inside the rows whose cell won (`winners` on the device); returns the elements updated as
    a 0-dim tensor on the device (reading it is a host sync)."""
    device = params[0].device
    plan = _plan(segments, device)
    winners = to_device(winners, device)
    if not plan.n_update_blocks:
        return torch.zeros((), dtype=torch.int64, device=device)
    coefs = torch.tensor([(1.0 - lr * wd, -lr / bias_correction1)
                          for lr, wd in zip(lrs.tolist(), weight_decays.tolist())], dtype=torch.float32)
    _update[(plan.n_update_blocks,)](_pointer_table("update", segments, params, exp_avgs, exp_avg_sqs), len(params),
                                     plan.update_blocks, winners.view(torch.uint8), to_device(coefs, device),
                                     math.sqrt(bias_correction2), eps, BLOCK=BLOCK, num_warps=8)
    return (winners[plan.row_cells] * plan.row_lengths).sum()


class _Whole:
    """Stand-in segment table of a plain AdamW call: the blocks of whole tensors, cached by their sizes."""

    def __init__(self, numels: list[int], device: torch.device) -> None:
        n = torch.tensor(numels, dtype=torch.int64)
        _, *spans = _blocks(torch.arange(len(numels)), torch.zeros_like(n), n, BLOCK)
        self.n_blocks = len(spans[0])
        self.blocks = torch.stack(spans, dim=1).to(device)
        self.plans: dict = {}


_wholes: dict[tuple, _Whole] = {}  # by device and sizes
_WHOLES_LIMIT = 64


def _fused_step(beta1: float, beta2: float, bias_correction1: float, bias_correction2: float) -> int | None:
    """The step t whose bias corrections these are (what torch's fused AdamW takes), or None."""
    if not 0.0 < bias_correction1 < 1.0 or beta1 <= 0.0:
        return None
    t = round(math.log1p(-bias_correction1) / math.log(beta1))
    ok = t >= 1 and 1 - beta1**t == bias_correction1 and 1 - beta2**t == bias_correction2
    return t if ok else None


def fused_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], t: int,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Step t of torch's fused AdamW (it takes the step, not the bias corrections)."""
    steps = [torch.full((), float(t), dtype=torch.float32, device=params[0].device)] * len(params)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


def adamw_step_multi(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction1: float,
                     bias_correction2: float) -> None:
    if not params:
        return
    device = params[0].device
    t = _fused_step(beta1, beta2, bias_correction1, bias_correction2) if device.type == "cuda" else None
    if t is not None:  # torch's fused AdamW: the same 28 bytes per element, tuned by torch
        fused_adamw(params, grads, exp_avgs, exp_avg_sqs, t, lr, beta1, beta2, eps, weight_decay)
        return
    key = (device, *(p.numel() for p in params))
    whole = _wholes.get(key)
    if whole is None:
        if len(_wholes) >= _WHOLES_LIMIT:
            _wholes.clear()
        whole = _wholes[key] = _Whole([p.numel() for p in params], device)
    if not whole.n_blocks:
        return
    w1, b2, w2, small_w1 = _moments(beta1, beta2)
    _adamw[(whole.n_blocks,)](_pointer_table("adamw", whole, params, grads, exp_avgs, exp_avg_sqs), len(params),
                              whole.blocks, w1, b2, w2, 1.0 - lr * weight_decay, -lr / bias_correction1,
                              math.sqrt(bias_correction2), eps, SMALL_W1=small_w1, BLOCK=BLOCK, num_warps=8)
