"""Torch implementation of the MoLF element-wise passes (any device; q is `molf_ds.scores`' row of the score).

Segment work is cut into pieces of at most ``CHUNK`` elements and batched so that each
batch spans at most ``CHUNK`` elements: temporaries stay bounded whatever the tensor
size, and sums follow a fixed order (per-piece sums in double, then per segment).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ...scores import SCORE_EPS, score_named

CHUNK = 1 << 20

Piece = tuple[int, int]  # (start, length)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync (from pinned memory, non-blocking on CUDA)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _CellLayers:
    """A table's rows in layers of distinct cells (the k-th row of every cell in layer k): adding layer after layer
    with index_add_ adds each cell's rows in row order, without two rows of one cell in one launch (on CUDA those
    would meet in atomics, in no fixed order)."""

    def __init__(self, cells: torch.Tensor, kinds: torch.Tensor, device: torch.device) -> None:
        seen: dict[int, int] = {}
        layers: list[list[int]] = []
        for row, cell in enumerate(cells.tolist()):
            k = seen[cell] = seen.get(cell, -1) + 1
            if k == len(layers):
                layers.append([])
            layers[k].append(row)
        self.layers = [(torch.tensor(rows, device=device), cells[rows].to(device)) for rows in layers]
        self.cells, self.kinds = cells.to(device), kinds.to(device)


def add_row_sums(sums: torch.Tensor, took_part: torch.Tensor, values: torch.Tensor, segments, scale: torch.Tensor,
                 columns: torch.Tensor) -> None:
    """sums[cell, columns[kind, c]] += values[row, c] * scale[kind of row], rows of a cell in row order;
    took_part[cell] = True. `sums` [cells, width], `values` [rows, channels], all on the device of `sums`."""
    device = sums.device
    layers = segments.plans.get(("layers", device))
    if layers is None:
        layers = segments.plans[("layers", device)] = _CellLayers(segments.cells, segments.kinds, device)
    scaled = values * to_device(scale, device)[layers.kinds].unsqueeze(1)
    # each row's channels at their flat places in the table (distinct per row: a cell's columns differ by channel)
    places = layers.cells.unsqueeze(1) * sums.shape[1] + to_device(columns, device)[layers.kinds]
    flat = sums.view(-1)
    for rows, _ in layers.layers:
        flat.index_add_(0, places[rows].view(-1), scaled[rows].view(-1))
    took_part[layers.cells] = True


def _split(offsets: torch.Tensor, lengths: torch.Tensor) -> tuple[list[Piece], list[int]]:
    """Pieces of at most CHUNK elements, in segment order, and the piece count per segment."""
    pieces: list[Piece] = []
    counts: list[int] = []
    for start, length in zip(offsets.tolist(), lengths.tolist()):
        cuts = [(s, min(CHUNK, start + length - s)) for s in range(start, start + length, CHUNK)]
        pieces += cuts
        counts.append(len(cuts))
    return pieces, counts


def _batches(pieces: list[Piece]) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped so that each group spans at most CHUNK elements."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        if batch and size + piece[1] > CHUNK:
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece[1]
    if batch:
        yield batch


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The tensor as 1-D, sharing its storage: segment offsets index its elements in order."""
    try:
        return t.view(-1)
    except RuntimeError as exc:
        raise ValueError(f"segments need a 1-D or contiguous tensor, got shape {tuple(t.shape)}") from exc


def _views(t: torch.Tensor, batch: list[Piece]) -> list[torch.Tensor]:
    flat = _flat(t)
    return [flat[s : s + n] for s, n in batch]


def _update_moments(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float
) -> None:
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _update_ranges(
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
    for batch in _batches(_split(offsets, lengths)[0]):
        params = _views(param, batch)
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        denom = torch._foreach_sqrt(_views(exp_avg_sq, batch))
        torch._foreach_div_(denom, math.sqrt(bias_correction2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, _views(exp_avg, batch), denom, value=-lr / bias_correction1)


def _adamw_step(
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
    _update_moments(grad, exp_avg, exp_avg_sq, beta1, beta2)
    whole = torch.tensor([0]), torch.tensor([param.numel()])
    _update_ranges(
        param, exp_avg, exp_avg_sq, *whole, lr, weight_decay, bias_correction1, bias_correction2, eps
    )


def _rows_by_tensor(table: torch.Tensor, n_tensors: int) -> list[list[list[int]]]:
    rows: list[list[list[int]]] = [[] for _ in range(n_tensors)]
    for row in table.tolist():
        rows[row[0]].append(row)
    return rows


class _TensorPlan:
    """The piece batches of one tensor's segments with their lengths already on the device: a step then
    copies nothing from the host (a host-to-device copy of a Python list would synchronise the stream)."""

    def __init__(self, rows: list[list[int]], device: torch.device) -> None:
        offsets = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        lengths = torch.tensor([r[2] for r in rows], dtype=torch.int64)
        pieces, counts = _split(offsets, lengths)
        self.batches = [(b, torch.tensor([n for _, n in b], dtype=torch.int64, device=device)) for b in _batches(pieces)]
        self.counts = torch.tensor(counts, dtype=torch.int64, device=device)
        self.empty = not counts


def _planned_scores(param, grad, exp_avg, exp_avg_sq, beta1, beta2, plan: _TensorPlan, score, eps_s
                    ) -> torch.Tensor:
    """[rows of the tensor, channels]: each channel's sum per row."""
    _update_moments(grad, exp_avg, exp_avg_sq, beta1, beta2)
    row = score_named(score)
    if plan.empty:
        return exp_avg.new_zeros(0, row.n_channels, dtype=torch.float64)
    sums: list[list[torch.Tensor]] = [[] for _ in range(row.n_channels)]
    for batch, lengths in plan.batches:
        params = _views(param, batch) if row.needs_params else []
        for c, q in enumerate(row.channels(_views(exp_avg, batch), _views(exp_avg_sq, batch), params, eps_s)):
            flat = (torch.cat(q) if len(q) > 1 else q[0]).double()
            sums[c].append(torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True))
    return torch.stack([torch.segment_reduce(torch.cat(s), "sum", lengths=plan.counts, unsafe=True) for s in sums],
                       dim=1)


def segment_sums_multi(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    segments,
    beta1: float,
    beta2: float,
    score: str,
    eps_s: float = SCORE_EPS,
) -> torch.Tensor:
    """Moments of every tensor; the sum of each of the score's channels over every row of `segments` (a
    kernels.SegmentTable), [rows, channels] in row order, float64 on the tensors' device (`params` read where the
    score needs them)."""
    device = grads[0].device if grads else torch.device("cpu")
    plans = segments.plans.get(device)
    if plans is None:
        plans = segments.plans[device] = [_TensorPlan(rows, device)
                                          for rows in _rows_by_tensor(segments.table, len(grads))]
    out = [_planned_scores(p, g, m, v, beta1, beta2, plan, score, eps_s)
           for plan, p, g, m, v in zip(plans, params, grads, exp_avgs, exp_avg_sqs)]
    return torch.cat(out) if out else torch.zeros(0, score_named(score).n_channels, dtype=torch.float64)


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
    won, lr, wd = winners.tolist(), lrs.tolist(), weight_decays.tolist()
    updated = 0
    for rows, p, m, v in zip(_rows_by_tensor(table, len(params)), params, exp_avgs, exp_avg_sqs):
        by_kind: dict[int, tuple[list[int], list[int]]] = {}
        for _, offset, length, cell, kind in rows:
            if won[cell]:
                offsets, lengths = by_kind.setdefault(kind, ([], []))
                offsets.append(offset)
                lengths.append(length)
                updated += length
        for kind, (offsets, lengths) in by_kind.items():
            _update_ranges(p, m, v, torch.tensor(offsets), torch.tensor(lengths), lr[kind], wd[kind],
                                bias_correction1, bias_correction2, eps)
    return updated


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
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        _adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2)

