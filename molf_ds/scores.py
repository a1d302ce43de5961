"""The routing scores as data: one row per score type (docs/design.md, "The algorithm", step 1).

Every element of an expert yields a score's `channels` (per element, from its updated, not bias-corrected moments m
and v, with eps_s, not the optimizer's eps, and, for a score that `needs_params`, the parameter before the step).
Each channel is summed per segment, times the kind's lr when the score `carries_lr`, into one column of the cell's
row of the score table [cells, width]: the column is the channel's, by the segment's role (`ROLES`: which part of
the module's effective weight W + sum_i s_i B_i A_i the segment is). `finish` makes the scores from the table (summed
over ranks), the experts' sizes N_e and their LoRA scalings s. The kernels switch on `code` (the C++ kernel's
`switch`, Triton's constexpr); `channels` is the torch definition every backend is tested against.

Adding a score: one row here plus one case in each kernel's channels (molf_ds/csrc, the Triton kernel).
This module imports torch only, so the config, the rule and the kernels can all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

SCORE_EPS = 1e-8  # eps_s
ROLES = ("weight", "lora_A", "lora_B")  # the full expert's W (and bias), a LoRA expert's A, its B
WEIGHT, LORA_A, LORA_B = range(len(ROLES))

Channels = Callable[[list[Tensor], list[Tensor], list[Tensor], float], list[list[Tensor]]]


def _denominators(vs: list[Tensor], eps_s: float) -> list[Tensor]:
    """sqrt(v) + eps_s, the preconditioner every score divides by."""
    return torch._foreach_add(torch._foreach_sqrt(vs), eps_s)


def _epd(ms: list[Tensor], vs: list[Tensor], ps: list[Tensor], eps_s: float) -> list[list[Tensor]]:
    """Expected parameter decrease: m^2 / (sqrt(v) + eps_s)."""
    q = torch._foreach_mul(ms, ms)
    torch._foreach_div_(q, _denominators(vs, eps_s))
    return [q]


def _pfn(ms: list[Tensor], vs: list[Tensor], ps: list[Tensor], eps_s: float) -> list[list[Tensor]]:
    """Preconditioned gradient norm: (m / (sqrt(v) + eps_s))^2."""
    q = torch._foreach_div(ms, _denominators(vs, eps_s))
    torch._foreach_mul_(q, q)
    return [q]


def _ldw(ms: list[Tensor], vs: list[Tensor], ps: list[Tensor], eps_s: float) -> list[list[Tensor]]:
    """Loss decrease per weight change: with u = m / (sqrt(v) + eps_s) (Adam's step per unit lr), m*u, u^2, p^2."""
    u = torch._foreach_div(ms, _denominators(vs, eps_s))
    return [torch._foreach_mul(ms, u), torch._foreach_mul(u, u), torch._foreach_mul(ps, ps)]


def _mean(sums: Tensor, sizes: Tensor, scalings: Tensor) -> Tensor:
    return sums[:, 0] / sizes.clamp(min=1)


def _root_mean(sums: Tensor, sizes: Tensor, scalings: Tensor) -> Tensor:
    return torch.sqrt(_mean(sums, sizes, scalings))


def _ldw_finish(sums: Tensor, sizes: Tensor, scalings: Tensor) -> Tensor:
    """sum(m*u) / ||change of the effective weight per unit lr||: ||U_W|| for `full` (its bias included), the bound
    s * (||U_B|| ||A|| + ||B|| ||U_A||) for a LoRA expert; 0 where that norm is 0 (then no element moves the
    module, and sum(m*u), a sum of m^2 / (sqrt(v) + eps_s), is 0 too unless A = B = 0)."""
    norms = sums[:, 1:].sqrt()  # ||U_W||, ||W||, ||U_A||, ||A||, ||U_B||, ||B||
    change = norms[:, 0] + scalings * (norms[:, 4] * norms[:, 3] + norms[:, 5] * norms[:, 2])
    return torch.where(change > 0, sums[:, 0] / change, torch.zeros_like(change))


@dataclass(frozen=True)
class Score:
    name: str
    code: int  # the kernels' switch value: the row's index in SCORES
    channels: Channels  # per element, from lists of m, v and p: one list of tensors per channel
    columns: tuple[tuple[int, ...], ...]  # per role, the table column each channel adds into
    needs_params: bool  # the channels read the parameters (before the step)
    carries_lr: bool  # the sums are taken times each kind's lr
    finish: Callable[[Tensor, Tensor, Tensor], Tensor]  # (table [cells, width], N_e, s) -> score per cell

    @property
    def n_channels(self) -> int:
        return len(self.columns[0])

    @property
    def width(self) -> int:
        return 1 + max(max(cols) for cols in self.columns)


ONE_COLUMN = ((0,),) * len(ROLES)
SCORES = (
    Score("epd", 0, _epd, ONE_COLUMN, needs_params=False, carries_lr=True, finish=_mean),
    Score("pfn", 1, _pfn, ONE_COLUMN, needs_params=False, carries_lr=False, finish=_root_mean),
    # columns: sum(m*u) of every role, then per role sum(u^2) and sum(p^2)
    Score("ldw", 2, _ldw, ((0, 1, 2), (0, 3, 4), (0, 5, 6)), needs_params=True, carries_lr=False,
          finish=_ldw_finish),
)
SCORE_NAMES = tuple(score.name for score in SCORES)
assert all(score.code == i for i, score in enumerate(SCORES)), "a score's code is its index"


def score_named(name: str) -> Score:
    """The row of score `name`; a ValueError naming the known ones otherwise."""
    for score in SCORES:
        if score.name == name:
            return score
    raise ValueError(f"score must be one of {SCORE_NAMES}, got {name!r}")
