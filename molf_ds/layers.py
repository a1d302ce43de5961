"""MoLFLinear: a base linear plus LoRA experts, y = W x + b + sum_i s_i B_i A_i dropout(x)."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MoLFLinear(nn.Module):
    """Wraps (reuses, never copies) `base_layer`; experts are `full` (W, b) and `lora{i}` (A_i, B_i)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        ranks: Sequence[int],
        alphas: Sequence[float],
        use_rslora: bool = True,
        dropout: float = 0.0,
        trains_base: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        kw = dict(bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.ModuleList(nn.Linear(base_layer.in_features, r, **kw) for r in ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, base_layer.out_features, **kw) for r in ranks)
        self.scaling = [a / (math.sqrt(r) if use_rslora else r) for r, a in zip(ranks, alphas)]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        loras = [f"lora{i}" for i in range(len(ranks))]
        self.expert_names = (["full"] if trains_base else []) + loras
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        params = [lin.weight for lin in (*self.lora_A, *self.lora_B)]
        with _full_parameters(params):
            for a, b in zip(self.lora_A, self.lora_B):
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = self.base_layer(rows)  # 2-D, so that the experts add into y itself, not into a view of it
        h, keep_scale = self._dropout(rows)
        # the experts' weights are used directly, not through their modules: under ZeRO-3 they are resident
        # (molf_ds.zero.attach), so DeepSpeed need not run its gather/release hooks around them
        if len(self.lora_A) == 1:
            # y += s * (h A^T) B^T in one BLAS call, in place (the base's backward does not need y; the dropout's
            # 1/(1-p) folded into alpha): no output-sized temporary, no copy of y
            a, b = self.lora_A[0].weight, self.lora_B[0].weight
            t = F.linear(h.to(a.dtype), a)
            y.addmm_(t.to(y.dtype), b.t().to(y.dtype), alpha=self.scaling[0] * keep_scale)
        else:
            weights = [a.weight for a in self.lora_A] + [b.weight for b in self.lora_B]
            y = _Experts.apply(y, h, tuple(s * keep_scale for s in self.scaling), *weights)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _dropout(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The experts' input after dropout, and the scale its kept elements are still owed."""
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        if not self.training or p == 0.0:
            return x, 1.0
        from .optim import kernels  # (molf_ds.optim imports this module)

        if x.device.type == "cpu" and kernels.cpp_enabled():
            return kernels.dropout_zero(x, p), 1.0 / (1.0 - p)
        return self.lora_dropout(x), 1.0

    def expert_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each expert, keyed by expert name (the `full` expert only when it trains)."""
        experts = {f"lora{i}": [a.weight, b.weight] for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B))}
        if "full" in self.expert_names:
            base = self.base_layer
            experts = {"full": [base.weight] + ([base.bias] if base.bias is not None else []), **experts}
        return experts

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor W + sum_i s_i B_i A_i (computed in fp32, returned in W's dtype)."""
        w = self.base_layer.weight.float()
        for a, b, s in zip(self.lora_A, self.lora_B, self.scaling):
            w = w + s * (b.weight.float() @ a.weight.float())
        return w.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """The base layer with every expert folded into its weight, in place."""
        self.base_layer.weight.copy_(self.merged_weight())
        return self.base_layer

    def extra_repr(self) -> str:
        return f"experts={self.expert_names}, scaling={[round(s, 6) for s in self.scaling]}"


class _Experts(torch.autograd.Function):
    """y += sum_i s_i (h A_i^T) B_i^T for k >= 2 experts, in place in y (the base's backward does not need y), as
    one autograd node: their A_i stacked into one matrix and their B_i, scaled by s_i, side by side, so that k
    experts take one GEMM for h A^T and one for their sum into y, and in backward one GEMM for each of the gradients
    of A, B and h. (One expert runs as two plain ops: there this node measured no faster.)"""

    @staticmethod
    def forward(ctx, y: torch.Tensor, h: torch.Tensor, scales: tuple[float, ...], *weights: torch.Tensor
                ) -> torch.Tensor:
        a, b = _Experts.stacked(scales, weights)
        t = F.linear(h.to(a.dtype), a)  # (N, R)
        y.addmm_(t.to(y.dtype), b.t().to(y.dtype))
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, t, *weights)  # the weights, not their stacked copies: no activation memory
        ctx.scales = scales
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        h, t, *weights = ctx.saved_tensors
        a, b = _Experts.stacked(ctx.scales, weights)
        g = grad_y.to(b.dtype)
        grad_t = torch.mm(g, b)  # (N, R): d loss / d t, the B_i already scaled
        grad_h = torch.mm(grad_t.to(a.dtype), a).to(h.dtype) if ctx.needs_input_grad[1] else None
        ranks = [w.shape[0] for w in weights[:len(ctx.scales)]]
        grad_a = torch.mm(grad_t.t().to(a.dtype), h.to(a.dtype)).split(ranks)  # rows of A_i
        grad_b = torch.mm(g.t(), t.to(b.dtype)).split(ranks, dim=1)  # (out, R), unscaled
        return (grad_y, grad_h, None, *grad_a, *(gb * s for gb, s in zip(grad_b, ctx.scales)))

    @staticmethod
    def stacked(scales: tuple[float, ...], weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' A_i one below the other (R, in), and their s_i B_i side by side (out, R)."""
        k = len(scales)
        return torch.cat(weights[:k]), torch.cat([w * s for w, s in zip(weights[k:], scales)], dim=1)


def _full_parameters(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Under `deepspeed.zero.Init` the experts are created partitioned: gather them to initialise them
    (rank 0's values win); for ordinary parameters nothing happens."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # deferred: slow to import

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
