"""Reference MoLF AdamW: the test oracle, written from docs/design.md ("The algorithm") only.

A deliberately plain per-parameter implementation (per-tensor torch ops, no flat
layouts, no foreach, no fused kernels) of one MoLF optimizer step:

1. moments for every trainable parameter with a gradient (losers too),
2. plain AdamW for parameters outside MoLF modules (weight decay 0 for 1-D params,
   i.e. biases and norm weights),
3. per MoLF module and expert a score from the updated, not bias-corrected moments
   (EPD or PFN, eps_s = 1e-8, N_e elements; `full` includes the base bias; LDW also from the
   weights before the step and the LoRA scaling s),
4. top_k winners, ties to the lower expert index,
5. AdamW update (decoupled decay first) for the winners only,
6. the routing record in the routing-log format of docs/design.md ("The routing log").

Scores are computed in float64 from the fp32 moments.

MoLF modules are recognised by duck typing (`base_layer`, `lora_A`, `lora_B`,
`scaling`), not by importing the package, and the expert names are derived from the
spec (`full` iff the base weight is trainable, then `lora0`, `lora1`, ...).
"""
from __future__ import annotations

import math

import torch

EPS_S = 1e-8


def is_molf_module(mod: torch.nn.Module) -> bool:
    return all(hasattr(mod, a) for a in ("base_layer", "lora_A", "lora_B", "scaling"))


def spec_experts(mod: torch.nn.Module) -> list[tuple[str, list[tuple[str, torch.nn.Parameter, str]]]]:
    """[(expert_name, [(role, param, decay_kind), ...]), ...] in expert-index order.

    decay_kind is "full" (weight decay), "none" (base bias) or "lora" (LoRA decay).
    """
    experts = []
    base = mod.base_layer
    if base.weight.requires_grad:
        params = [("weight", base.weight, "full")]
        if base.bias is not None and base.bias.requires_grad:
            params.append(("bias", base.bias, "none"))
        experts.append(("full", params))
    for i, (a, b) in enumerate(zip(mod.lora_A, mod.lora_B)):
        params = [(f"lora_A.{i}", a.weight, "lora"), (f"lora_B.{i}", b.weight, "lora")]
        params = [x for x in params if x[1].requires_grad]
        if params:
            experts.append((f"lora{i}", params))
    return experts


class ReferenceMoLF:
    """Reference optimizer over `model` (already wrapped), configured by a MoLFConfig.

    Usage per step: backward, then `record = ref.step(lr_scale)`, then `ref.zero_grad()`.
    `lr_scale` is the LR-schedule factor of this step (group lr / base lr).
    """

    def __init__(self, model: torch.nn.Module, cfg) -> None:
        self.model = model
        self.cfg = cfg
        self.t = 0
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # id(param) -> {"exp_avg", "exp_avg_sq", "step"}
        self.molf_modules: list[tuple[str, torch.nn.Module]] = []
        molf_param_ids: set[int] = set()
        for name, mod in model.named_modules():
            if is_molf_module(mod):
                self.molf_modules.append((name, mod))
                for p in mod.parameters():
                    molf_param_ids.add(id(p))
        # Everything outside MoLF modules: plain AdamW (named_parameters dedups tied weights).
        self.other_params = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in molf_param_ids
        ]
        self.all_trainable = [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ helpers
    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _moments(self, p: torch.Tensor) -> None:
        b1, b2 = self.cfg.betas
        g = p.grad.detach()
        st = self.state.get(id(p))
        if st is None:
            st = self.state[id(p)] = {
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                "step": 0,
            }
        st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        st["step"] += 1

    def _adamw_update(self, p: torch.Tensor, lr: float, wd: float) -> None:
        b1, b2 = self.cfg.betas
        t = self.t
        st = self.state[id(p)]
        with torch.no_grad():
            p.mul_(1 - lr * wd)
            bc1 = 1 - b1**t
            bc2 = 1 - b2**t
            denom = st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + self.cfg.eps
            p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)

    def _score(self, params: list[torch.Tensor], lr_e: float, scaling: float | None) -> float:
        """`scaling`: the LoRA expert's s (None for `full`)."""
        n = sum(p.numel() for p in params)
        if self.cfg.score == "epd":
            total = 0.0
            for p in params:
                st = self.state[id(p)]
                m = st["exp_avg"].double()
                v = st["exp_avg_sq"].double()
                total += float((m * m / (v.sqrt() + EPS_S)).sum())
            return lr_e / n * total
        if self.cfg.score == "pfn":
            total = 0.0
            for p in params:
                st = self.state[id(p)]
                m = st["exp_avg"].double()
                v = st["exp_avg_sq"].double()
                total += float(((m / (v.sqrt() + EPS_S)) ** 2).sum())
            return math.sqrt(total) / math.sqrt(n)
        if self.cfg.score == "ldw":
            return self._ldw(params, scaling)
        raise ValueError(self.cfg.score)

    def _ldw(self, params: list[torch.Tensor], scaling: float | None) -> float:
        """sum(m * u) over the expert, u = m / (sqrt(v) + eps_s), divided by how far one unit of lr moves the
        module's effective weight: ||u|| over W and its bias for `full`; for a LoRA expert (params [A, B]) the
        bound s * (||u_B|| * ||A|| + ||B|| * ||u_A||) of ||s * (u_B A + B u_A)||."""
        gain, unorm = 0.0, []
        for p in params:
            st = self.state[id(p)]
            m = st["exp_avg"].double()
            u = m / (st["exp_avg_sq"].double().sqrt() + EPS_S)
            gain += float((m * u).sum())
            unorm.append(float(u.norm()))
        if scaling is None:
            change = math.hypot(*unorm)
        else:
            (a, b), (ua, ub) = (float(p.double().norm()) for p in params), unorm
            change = scaling * (ub * a + b * ua)
        return gain / change if change > 0 else 0.0

    # --------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> dict:
        cfg = self.cfg
        self.t += 1
        full_lr = cfg.lr * lr_scale
        lora_lr = cfg.lora_lr * lr_scale

        # 1. moments, every trainable param with a grad (winners and losers alike).
        for p in self.all_trainable:
            if p.grad is not None:
                self._moments(p)

        # 2. plain AdamW outside MoLF modules.
        for _, p in self.other_params:
            if p.grad is None:
                continue
            wd = 0.0 if p.dim() <= 1 else cfg.weight_decay
            self._adamw_update(p, full_lr, wd)

        # 3.-6. routing per MoLF module.
        modules = {}
        for name, mod in self.molf_modules:
            names, scores, members = [], [], []
            for ename, params in spec_experts(mod):
                with_grad = [x for x in params if x[1].grad is not None]
                if not with_grad:
                    continue  # takes no part
                lr_e = full_lr if ename == "full" else lora_lr
                names.append(ename)
                scaling = None if ename == "full" else mod.scaling[int(ename.removeprefix("lora"))]
                scores.append(self._score([x[1] for x in with_grad], lr_e, scaling))
                members.append((lr_e, with_grad))
            order = sorted(range(len(names)), key=lambda i: (-scores[i], i))
            winners = order[: cfg.top_k]
            for i in winners:
                lr_e, params = members[i]
                for _, p, kind in params:
                    wd = {"full": cfg.weight_decay, "none": 0.0, "lora": cfg.lora_weight_decay}[kind]
                    self._adamw_update(p, lr_e, wd)
            modules[name] = {
                "winners": [names[i] for i in winners],
                "scores": {names[i]: scores[i] for i in range(len(names))},
            }
        return {"step": self.t, "lr_scale": lr_scale, "modules": modules}
