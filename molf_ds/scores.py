"""The routing scores as data: one row per score type (docs/design.md, "The algorithm", step 1).

A score of an expert is `finish(scale * sum(q) / N_e)`: q of every element from its updated, not bias-corrected
moments m and v (with eps_s, not the optimizer's eps), summed over the expert's N_e elements, times the kind's lr
when the score `carries_lr`, then `finish`ed. The kernels switch on `code` (the C++ kernel's `switch`, Triton's
constexpr); `q` is the torch definition every backend is tested against.

Adding a score: one row here plus one case in each kernel's q (molf_ds/csrc, the Triton kernel).
This module imports torch only, so the config, the rule and the kernels can all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

SCORE_EPS = 1e-8  # eps_s


def _epd_q(ms: list[Tensor], vs: list[Tensor], eps_s: float) -> list[Tensor]:
    """Expected parameter decrease: m^2 / (sqrt(v) + eps_s)."""
    denom = torch._foreach_add(torch._foreach_sqrt(vs), eps_s)
    q = torch._foreach_mul(ms, ms)
    torch._foreach_div_(q, denom)
    return q


def _pfn_q(ms: list[Tensor], vs: list[Tensor], eps_s: float) -> list[Tensor]:
    """Preconditioned gradient norm: (m / (sqrt(v) + eps_s))^2."""
    denom = torch._foreach_add(torch._foreach_sqrt(vs), eps_s)
    q = torch._foreach_div(ms, denom)
    torch._foreach_mul_(q, q)
    return q


@dataclass(frozen=True)
class Score:
    name: str
    code: int  # the kernels' switch value: the row's index in SCORES
    q: Callable[[list[Tensor], list[Tensor], float], list[Tensor]]  # per element, from lists of m and v
    carries_lr: bool  # the sums are taken times each kind's lr
    finish: Callable[[Tensor], Tensor]  # from the per-element mean to the score


SCORES = (
    Score("epd", 0, _epd_q, carries_lr=True, finish=lambda mean: mean),
    Score("pfn", 1, _pfn_q, carries_lr=False, finish=torch.sqrt),
)
SCORE_NAMES = tuple(score.name for score in SCORES)
assert all(score.code == i for i, score in enumerate(SCORES)), "a score's code is its index"


def score_named(name: str) -> Score:
    """The row of score `name`; a ValueError naming the known ones otherwise."""
    for score in SCORES:
        if score.name == name:
            return score
    raise ValueError(f"score must be one of {SCORE_NAMES}, got {name!r}")
