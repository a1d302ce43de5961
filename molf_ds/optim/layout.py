"""Where each expert lives: the (module, expert) cells and the segments of the flat tensors the optimizer steps.

A *cell* is one expert of one MoLF module, numbered `module * n_experts + expert`. A *layout* lists the
segments `(offset, length, cell, kind)` of one flat tensor; the kind (`routing.KINDS`: full weight, full
bias, LoRA A, LoRA B) sets the segment's lr and weight decay. Without ZeRO every parameter is its own flat tensor
with a single segment; the ZeRO adapters build layouts of DeepSpeed's fp32 partitions instead, so the
optimizer runs one code path for every stage.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..wrapping import full_numel, molf_modules
from .routing import FULL, FULL_BIAS, LORA_A_KIND, LORA_B_KIND


class Layout:
    """The segments (offset, length, cell, kind) of one flat tensor, sorted by offset; empty ones dropped."""

    def __init__(self, segments: list[tuple[int, int, int, int]]) -> None:
        self.segments = sorted(s for s in segments if s[1] > 0)


class LayoutSource(Protocol):
    def __call__(self, flat: torch.Tensor) -> Layout | None: ...


def projection_type(module: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`."""
    return module.rsplit(".", 1)[-1]


class ExpertIndex:
    """The MoLF modules of a model, their experts, and which expert every parameter belongs to."""

    def __init__(self, model: nn.Module) -> None:
        modules = molf_modules(model)
        if not modules:
            raise ValueError("the model has no MoLF layers: call molf_ds.wrap_model(model, cfg) first")
        self.module_names = [name for name, _ in modules]
        self.expert_names = list(modules[0][1].expert_names)
        self.cell_of: dict[int, int] = {}  # id(param) -> cell
        self.kind_of: dict[int, int] = {}  # id(param) -> kind
        self.params_by_cell: dict[int, list[nn.Parameter]] = {}
        sizes = torch.zeros(len(modules), len(self.expert_names), dtype=torch.float64)
        scalings = torch.ones_like(sizes)
        for m, (name, module) in enumerate(modules):
            if module.expert_names != self.expert_names:
                raise ValueError(f"{name} has experts {module.expert_names}, others {self.expert_names}")
            for e, params in enumerate(module.expert_parameters().values()):
                cell = m * self.n_experts + e
                self.params_by_cell[cell] = params
                for p in params:
                    self.cell_of[id(p)] = cell
                    self.kind_of[id(p)] = _kind(p, module)
                sizes[m, e] = sum(full_numel(p) for p in params)
            n_full = len(self.expert_names) - len(module.scaling)
            scalings[m, n_full:] = torch.tensor(module.scaling, dtype=torch.float64)
        self.sizes = sizes  # N_e per (module, expert)
        self.scalings = scalings  # s per LoRA expert (1 for `full`)
        self.modules_by_type: dict[str, list[int]] = {}  # projection type (q_proj, ...) -> module indices
        for m, name in enumerate(self.module_names):
            self.modules_by_type.setdefault(projection_type(name), []).append(m)

    @property
    def n_modules(self) -> int:
        return len(self.module_names)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def param_layout(self, param: torch.Tensor) -> Layout | None:
        """The layout of an unpartitioned parameter: one segment covering it, or None outside MoLF."""
        cell = self.cell_of.get(id(param))
        return None if cell is None else Layout([(0, param.numel(), cell, self.kind_of[id(param)])])


def _kind(p: nn.Parameter, module: nn.Module) -> int:
    if p is module.base_layer.weight:
        return FULL
    if p is module.base_layer.bias:
        return FULL_BIAS
    return LORA_A_KIND if any(p is a.weight for a in module.lora_A) else LORA_B_KIND


class ParamLayouts:
    """LayoutSource for optimizers that step the model's own parameters (no ZeRO partitioning)."""

    def __init__(self, index: ExpertIndex) -> None:
        self.index = index
        self._cache: dict[int, Layout | None] = {}

    def __call__(self, flat: torch.Tensor) -> Layout | None:
        key = id(flat)
        if key not in self._cache:
            self._cache[key] = self.index.param_layout(flat)
        return self._cache[key]
