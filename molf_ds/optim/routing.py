"""The MoLF routing rule, in one place (docs/design.md, "The algorithm").

Every expert of every MoLF module keeps exact Adam moments. Each step, per module:

1. each expert's score comes from its updated, not bias-corrected moments m and v (and its parameters, for LDW):
   per element a score's channels, summed over the expert's elements by role into a table (times the expert's lr
   where the score carries it), finished with the experts' sizes N_e and LoRA scalings; the score types (EPD, PFN,
   LDW) are rows of `molf_ds.scores`;
2. the top_k scores win, ties to the lower expert index; an expert that took no part (no gradient) never wins;
3. only the winners take the AdamW update (decoupled weight decay first), each segment with its kind's lr and decay.

The element-wise passes of steps 1 and 3 run in `kernels` over flat tensors whose segments `layout.py` maps to
(module, expert) cells: torch, the fused C++ CPU kernel or the Triton GPU kernels. Everything else (normalisation,
top-k, which rows update) is defined here, once, for all; it runs on the device the sums are on (no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import MoLFConfig
from ..scores import LORA_A, LORA_B, SCORE_EPS, WEIGHT, score_named
from . import kernels

ScoreReducer = Callable[[Tensor], None]  # in-place SUM of the score table over data-parallel ranks


@dataclass(frozen=True)
class Kind:
    """What a segment of an expert is, and which MoLFConfig fields give its lr and weight decay."""

    name: str
    lr: str
    weight_decay: str | None  # None: never decayed
    role: int  # molf_ds.scores.ROLES: which part of the module's effective weight the segment is


KINDS = (
    Kind("full", lr="lr", weight_decay="weight_decay", role=WEIGHT),  # the base weight: the FFT expert
    Kind("full_bias", lr="lr", weight_decay=None, role=WEIGHT),  # its bias, part of the FFT expert
    Kind("lora_A", lr="lora_lr", weight_decay="lora_weight_decay", role=LORA_A),
    Kind("lora_B", lr="lora_lr", weight_decay="lora_weight_decay", role=LORA_B),
)
FULL, FULL_BIAS, LORA_A_KIND, LORA_B_KIND = range(len(KINDS))
LORA_KINDS = (LORA_A_KIND, LORA_B_KIND)


def kind_lrs(cfg: MoLFConfig, lr_scale: float) -> Tensor:
    """Each kind's lr at this step (the schedule's factor applied), float64."""
    return torch.tensor([getattr(cfg, kind.lr) * lr_scale for kind in KINDS], dtype=torch.float64)


def kind_weight_decays(cfg: MoLFConfig) -> Tensor:
    return torch.tensor([getattr(cfg, kind.weight_decay) if kind.weight_decay else 0.0 for kind in KINDS],
                        dtype=torch.float64)


def kind_columns(score: str) -> Tensor:
    """Per kind, the score table's column of each of the score's channels (by the kind's role), int64."""
    columns = score_named(score).columns
    return torch.tensor([columns[kind.role] for kind in KINDS], dtype=torch.int64)


def module_scores(sums: Tensor, sizes: Tensor, scalings: Tensor, took_part: Tensor, score: str) -> Tensor:
    """Scores [modules, experts] (float64) from the score table of the whole model ([cells, width], step 1's
    finish with the experts' sizes and LoRA scalings, both [modules, experts]); -inf where an expert took no part.
    Where the score carries the lr, the sums already do."""
    table = sums.view(sizes.numel(), -1)
    scores = score_named(score).finish(table, sizes.double().reshape(-1), scalings.double().reshape(-1))
    return scores.view(sizes.shape).masked_fill(~took_part.view(sizes.shape), -torch.inf)


def top_k(scores: Tensor, took_part: Tensor, k: int) -> Tensor:
    """Winner mask [modules, experts] (step 2): per module the k highest scores, ties to the lower expert index
    (a stable descending sort), never an expert that took no part."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    winners = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, order, True)
    return winners & took_part.view(scores.shape)


class StepRouting:
    """One optimizer step's routing: `score` once per step() call that carries experts (DeepSpeed may split a step
    into several), then `route` once every expert's sums are in, then `update` the winners.

    With `presumed` winners (speculative_update: last step's), `score` also updates their rows in the same pass,
    keeping the old values in `backups`; `update` then restores wrong guesses and updates missed winners. The
    result is bit for bit the two-pass step's."""

    def __init__(self, step: int, cfg: MoLFConfig, n_cells: int, lr_scale: float, presumed: Tensor | None) -> None:
        self.step, self.cfg, self.lr_scale, self.presumed = step, cfg, lr_scale, presumed
        self.lrs, self.weight_decays = kind_lrs(cfg, lr_scale), kind_weight_decays(cfg)
        self.scale = self.lrs if score_named(cfg.score).carries_lr else torch.ones_like(self.lrs)  # of each kind's sums
        self.sums = kernels.ScoreSums(n_cells, kind_columns(cfg.score))
        self.batches: list[tuple[list[Tensor], list[Tensor], list[Tensor], kernels.SegmentTable,
                                 list[Tensor] | None]] = []

    def bias_corrections(self) -> tuple[float, float]:
        beta1, beta2 = self.cfg.betas
        return 1 - beta1**self.step, 1 - beta2**self.step

    def score(self, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              segments: kernels.SegmentTable, backups: list[Tensor] | None) -> int:
        """Step 1 on one call's tensors: moments of every element, score sums per cell (plus the presumed winners'
        update when `backups` are given). Returns the elements updated speculatively."""
        beta1, beta2 = self.cfg.betas
        self.batches.append((params, exp_avgs, exp_avg_sqs, segments, backups))
        if backups is None:
            kernels.moments_and_scores_multi(params, grads, exp_avgs, exp_avg_sqs, segments, self.scale, self.sums,
                                             beta1, beta2, self.cfg.score, SCORE_EPS)
            return 0
        return kernels.moments_scores_speculate_multi(
            params, grads, exp_avgs, exp_avg_sqs, backups, segments, self.scale, self.sums, self.presumed, self.lrs,
            self.weight_decays, beta1, beta2, *self.bias_corrections(), self.cfg.eps, self.cfg.score, SCORE_EPS)

    def route(self, sizes: Tensor, scalings: Tensor, reduce: ScoreReducer | None) -> tuple[Tensor, Tensor]:
        """Steps 1-2 over the whole model: (scores, winners), both [modules, experts] as `sizes` (N_e) and
        `scalings` (each LoRA expert's s). With `reduce`, this rank's table is summed over the data-parallel ranks
        first (each holds a partition of every expert), so every rank takes the same decision."""
        sums, took_part = self.sums.totals(), self.sums.took_part
        sizes, scalings = kernels.to_device(sizes, sums.device), kernels.to_device(scalings, sums.device)
        if reduce is not None:
            reduce(sums)
            took_part = sizes.view(-1) > 0  # partitioned gradients always exist
        scores = module_scores(sums, sizes, scalings, took_part, self.cfg.score)
        return scores, top_k(scores, took_part, self.cfg.top_k)

    def update(self, winners: Tensor) -> tuple[int, int]:
        """Step 3: the AdamW update of every row whose cell won. Returns (elements updated, elements restored)."""
        flat = winners.reshape(-1).contiguous()
        bc1, bc2 = self.bias_corrections()
        updated = restored = 0
        for params, exp_avgs, exp_avg_sqs, segments, backups in self.batches:
            if backups is None:
                updated += kernels.update_winners_multi(params, exp_avgs, exp_avg_sqs, segments, flat, self.lrs,
                                                        self.weight_decays, bc1, bc2, self.cfg.eps)
                continue
            done, undone = kernels.settle_multi(params, exp_avgs, exp_avg_sqs, backups, segments, self.presumed, flat,
                                                self.lrs, self.weight_decays, bc1, bc2, self.cfg.eps)
            updated, restored = updated + done, restored + undone
        return updated, restored
