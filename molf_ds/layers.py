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
        for a, b, s in zip(self.lora_A, self.lora_B, self.scaling):
            # the experts' weights are used directly, not through their modules: under ZeRO-3 they are resident
            # (molf_ds.zero.attach), so DeepSpeed need not run its gather/release hooks around them
            t = F.linear(h.to(a.weight.dtype), a.weight)
            # y += s * t B^T in one BLAS call, in place (the base's backward does not need y; the dropout's
            # 1/(1-p) folded into alpha): no output-sized temporary, no copy of y
            y.addmm_(t.to(y.dtype), b.weight.t().to(y.dtype), alpha=s * keep_scale)
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



def _full_parameters(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Under `deepspeed.zero.Init` the experts are created partitioned: gather them to initialise them
    (rank 0's values win); for ordinary parameters nothing happens."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # deferred: slow to import

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
