"""MoLFAdamW: AdamW that routes each module's update to its top-k experts (the rule: `routing.py`).

The optimizer steps *flat tensors* (parameters, or DeepSpeed's fp32 partitions) and learns from its `Router`
where the experts lie in them. Every tensor with a gradient updates its moments; MoLF tensors add their
segments' score sums into a [modules, experts] table, reduced across ranks once per step; then every rank
takes the same top-k and updates only the winners' segments. Tensors outside MoLF modules take plain AdamW.

All expert parameters share ONE param group (kind "molf"): DeepSpeed's ZeRO-1/2 optimizer calls the
wrapped optimizer once per group, and routing needs every expert's score before the first update. The
group's lr carries the schedule; each segment's lr is its kind's lr times the schedule's factor.

The protocol towards the ZeRO adapters (molf_ds/zero) and checkpoints, the only calls they make:
- `detach()` before DeepSpeed builds the engine, `attach(router)` once it has: the optimizer steps only when attached;
- `grouped_step()` around one wrapper step: DeepSpeed's several step() calls (one per group) make one step t;
- `finish_routing()` after the last sub-group, when the router is `deferred` (ZeRO-3);
- `record_skipped_step()` when DeepSpeed skipped a step (overflow): logged, no state changed;
- `molf_step` (read) and `restore_step(t)`: the step counter a checkpoint carries.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from ..config import MoLFConfig
from ..wrapping import decays
from . import kernels
from .layout import ExpertIndex, Layout, LayoutSource, ParamLayouts
from .routing import ScoreReducer, StepRouting
from .routing_log import RoutingLog

STEP_PASSES = ("moments", "speculative", "update", "restore", "adamw")


@dataclass
class Router:
    """What the optimizer needs to know of the engine that calls it (the ZeRO adapters build one)."""

    layouts: LayoutSource  # where the experts lie in each flat tensor step() is given
    reduce_scores: ScoreReducer | None = None  # the score all-reduce over data-parallel ranks, if partitioned
    deferred: bool = False  # ZeRO-3: step() only scores; the adapter calls finish_routing() after all sub-groups


class _Segments:
    """SegmentTable of a list of flat tensors (one step() call's MoLF group), cached by their layouts."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[list[Layout], kernels.SegmentTable]] = {}

    def __call__(self, layouts: list[Layout], numels: list[int]) -> kernels.SegmentTable:
        key = (*map(id, layouts), *numels)
        hit = self._cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], layouts)):
            return hit[1]
        rows = [(t, *segment) for t, layout in enumerate(layouts) for segment in layout.segments]
        table = kernels.SegmentTable(rows, numels)
        if len(self._cache) >= self.LIMIT:
            self._cache.clear()
        self._cache[key] = (layouts, table)  # holds the layouts: their ids stay theirs while cached
        return table


class MoLFAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]],
        index: ExpertIndex,
        cfg: MoLFConfig,
        routing_log: RoutingLog | None = None,
        router: Router | None = None,
    ) -> None:
        """`router` None: the optimizer steps the model's own parameters (no DeepSpeed, or DeepSpeed without a
        wrapper). `detach()` before handing it to DeepSpeed, which may call step() on zero grads while it sets
        up; the ZeRO adapter then `attach`es the router of the engine."""
        check_speculative_update(cfg)
        super().__init__(list(param_groups), dict(lr=cfg.lr, weight_decay=0.0, betas=cfg.betas, eps=cfg.eps))
        self.index = index
        self.cfg = cfg
        self.routing_log = routing_log
        self.router: Router | None = router or Router(ParamLayouts(index))
        self.molf_step = 0
        self.last_scores: torch.Tensor | None = None  # [modules, experts], -inf where an expert sat out
        self.last_winners: torch.Tensor | None = None  # [modules, experts] bool
        self.last_lr_scale = 0.0
        self._pinned_step: int | None = None
        self._routing: StepRouting | None = None
        self._segments = _Segments()
        # Elements of the last step, per pass: "moments" (MoLF tensors: moments and scores), "speculative" (of
        # those, updated in that pass, with backup), "update" (winners' update pass), "restore" (wrong guesses
        # restored), "adamw" (plain AdamW tensors). Memory traffic = 20, +12, 16, 8 and 28 bytes per element.
        # On the Triton path "update" is a 0-dim device tensor (reading it syncs with the device).
        self.last_step_elements = dict.fromkeys(STEP_PASSES, 0)
        self._counted_step = 0
        self._backups = WeakTensorKeyDictionary()  # param -> its old values during a speculative step
        self.kernel_backend: str | None = None  # which kernels ("cpp", "triton", "torch") step the MoLF tensors

    def detach(self) -> None:
        """step() does nothing until `attach`: DeepSpeed may call it on zero grads while it builds the engine."""
        self.router = None

    def attach(self, router: Router) -> None:
        self.router = router

    # ---- the step -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def grouped_step(self) -> Iterator[None]:
        """DeepSpeed's ZeRO-1/2 wrapper calls step() once per param group: inside, those calls make one step t."""
        self._pinned_step = self.molf_step + 1
        try:
            yield
        finally:
            self._pinned_step = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if self.router is None:
            return loss
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.molf_step = self._pinned_step or self.molf_step + 1
        beta1, beta2 = self.cfg.betas
        counts = self._counts(t)
        for group in self.param_groups:  # one kernel call per group: no per-parameter work in Python
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_of(p, t) for p in params]
            grads = [p.grad for p in params]
            exp_avgs = [state["exp_avg"] for state in states]
            exp_avg_sqs = [state["exp_avg_sq"] for state in states]
            if group["kind"] != "molf":
                kernels.adamw_step_multi(params, grads, exp_avgs, exp_avg_sqs, group["lr"], beta1, beta2,
                                         self.cfg.eps, group["weight_decay"], 1 - beta1**t, 1 - beta2**t)
                counts["adamw"] += sum(p.numel() for p in params)
                continue
            routing = self._routing_of(t)
            if self.kernel_backend is None:
                self.kernel_backend = kernels.backend(*params, *grads, *exp_avgs, *exp_avg_sqs)
            segments = self._segments([self.router.layouts(p) for p in params], [p.numel() for p in params])
            speculate = routing.presumed is not None and kernels.can_speculate(
                [*params, *grads, *exp_avgs, *exp_avg_sqs])
            backups = [self._backup_of(p) for p in params] if speculate else None
            counts["speculative"] += routing.score(params, grads, exp_avgs, exp_avg_sqs, segments, backups)
            counts["moments"] += sum(segments.numels)
            # Route before the plain groups step: the ranks meet at the all-reduce with less work behind them to
            # have drifted apart on.
            if not self.router.deferred:
                self.finish_routing()
        return loss

    def _routing_of(self, t: int) -> StepRouting:
        if self._routing is None or self._routing.step != t:
            presumed = (self.last_winners.reshape(-1).clone()
                        if self.cfg.speculative_update and self.last_winners is not None else None)
            self._routing = StepRouting(t, self.cfg, self.index.n_modules * self.index.n_experts, self.lr_scale,
                                        presumed)
        return self._routing

    def _backup_of(self, p: torch.Tensor) -> torch.Tensor:
        backup = self._backups.get(p)
        if backup is None:
            backup = self._backups[p] = torch.empty_like(p)
        return backup

    def _counts(self, t: int) -> dict[str, int]:
        if self._counted_step != t:
            self._counted_step = t
            self.last_step_elements = dict.fromkeys(STEP_PASSES, 0)
        return self.last_step_elements

    @torch.no_grad()  # ZeRO-3 calls it from its post-step, outside step()'s no_grad
    def finish_routing(self) -> None:
        """Route on the scores gathered this step, update the winners and log the step. Called by step() itself,
        or, with a deferred router (ZeRO-3), by the adapter once every sub-group has been through step()."""
        routing, self._routing = self._routing, None
        if routing is None:
            return
        # The one collective of the step, where it is needed: started earlier, in flight while the plain groups took
        # their AdamW step, it made the step 5-48 ms slower on CPU (2 gloo ranks, measured).
        self.last_scores, self.last_winners = routing.route(self.index.sizes, self.index.scalings,
                                                                  self.router.reduce_scores)
        updated, restored = routing.update(self.last_winners)
        counts = self._counts(routing.step)
        counts["update"] += updated
        counts["restore"] += restored
        self.last_lr_scale = routing.lr_scale
        if self.routing_log is not None and self.routing_log.wants(routing.step):
            self.routing_log.write(self.last_routing)

    def _state_of(self, p: torch.Tensor, t: int) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(t))
        return state

    # ---- reporting ------------------------------------------------------------------------------
    @property
    def lr_scale(self) -> float:
        """The LR schedule factor: the MoLF group's current lr over its configured lr."""
        group = next(g for g in self.param_groups if g["kind"] == "molf")
        return group["lr"] / group["base_lr"]

    @property
    def last_routing(self) -> dict[str, Any]:
        """The routing record of the last step, in the routing-log format (docs/design.md)."""
        names = self.index.expert_names
        modules = {}
        for name, scores, wins in zip(self.index.module_names, self.last_scores.tolist(), self.last_winners.tolist()):
            modules[name] = {
                "winners": [e for e, w in zip(names, wins) if w],
                "scores": {e: s for e, s in zip(names, scores) if s != -math.inf},
            }
        return {"step": self.molf_step, "lr_scale": self.last_lr_scale, "modules": modules}

    def record_skipped_step(self) -> None:
        """Log a step DeepSpeed skipped (overflow); no weight or moment changed, the step number is reused."""
        if self.routing_log is not None:
            record = {"step": self.molf_step + 1, "lr_scale": self.lr_scale, "skipped": True, "modules": {}}
            self.routing_log.write(record)

    def routing_shares(self) -> dict[str, float]:
        """Fraction of modules each expert won at the last step."""
        share = self.last_winners.double().mean(dim=0).tolist()
        return dict(zip(self.index.expert_names, share))

    def routing_shares_by_type(self) -> dict[str, dict[str, float]]:
        """Per projection type (a module name's last part, e.g. `q_proj`): the fraction of its modules each expert
        won at the last step."""
        wins = self.last_winners.double()
        return {kind: dict(zip(self.index.expert_names, wins[rows].mean(dim=0).tolist()))
                for kind, rows in self.index.modules_by_type.items()}

    # ---- checkpoints ----------------------------------------------------------------------------
    def restore_step(self, step: int) -> None:
        """Set the step counter from a checkpoint (DeepSpeed's ZeRO wrappers restore the moments but not it)."""
        if step < 0:
            raise ValueError(f"a MoLF step counter is never negative, got {step}")
        self.molf_step = int(step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The step counter comes back from the per-tensor `step` (DeepSpeed's ZeRO wrappers restore that state
        without calling this: `molf_ds.load_checkpoint` restores the counter from the engine's client state)."""
        super().load_state_dict(state_dict)
        self.molf_step = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)


def check_speculative_update(cfg: MoLFConfig) -> None:
    """`speculative_update` runs in the C++ CPU kernel only: without the kernel, an error rather than a silent
    two-pass step."""
    missing = kernels.cpp_unavailable() if cfg.speculative_update else None
    if missing:
        raise ValueError(f"MoLFConfig.speculative_update=True needs the C++ CPU kernel, which {missing}: set "
                         "speculative_update to false (the two-pass step: the same results, one more pass over "
                         "optimizer memory) or install g++ with OpenMP and ninja")


def param_groups(model: nn.Module, index: ExpertIndex, cfg: MoLFConfig) -> list[dict[str, Any]]:
    """The "molf" group (every expert parameter), then "decay" and "no_decay" for the rest; no empty groups."""
    kinds: dict[str, list[nn.Parameter]] = {"molf": [], "decay": [], "no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in index.cell_of:
            kinds["molf"].append(p)
        else:
            kinds["decay" if decays(p) else "no_decay"].append(p)
    base_lr = cfg.lr if cfg.trains_base else cfg.lora_lr
    settings = {"molf": (base_lr, cfg.weight_decay), "decay": (cfg.lr, cfg.weight_decay), "no_decay": (cfg.lr, 0.0)}
    return [
        {"params": params, "kind": kind, "lr": settings[kind][0], "base_lr": settings[kind][0],
         "weight_decay": settings[kind][1]}
        for kind, params in kinds.items()
        if params
    ]


def build_optimizer(
    model: nn.Module, cfg: MoLFConfig, routing_log: str | Path | RoutingLog | None = None
) -> MoLFAdamW:
    """MoLFAdamW over the trainable parameters of a model wrapped by `wrap_model`."""
    index = ExpertIndex(model)
    if index.expert_names != list(cfg.expert_names):
        raise ValueError(
            f"the model's MoLF experts {index.expert_names} differ from the config's {list(cfg.expert_names)}: "
            "build the optimizer with the MoLFConfig the model was wrapped with"
        )
    if routing_log is not None and not isinstance(routing_log, RoutingLog):
        routing_log = RoutingLog(routing_log, cfg.log_every)
    return MoLFAdamW(param_groups(model, index, cfg), index, cfg, routing_log)
