"""MoLFConfig: every MoLF setting, with defaults from the paper's reference runs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

from .scores import SCORE_NAMES

VARIANTS = ("molf", "molf-e")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DEFAULT_RANKS = {"molf": (128,), "molf-e": (32, 128)}


@dataclass
class MoLFConfig:
    """MoLF (full + LoRA experts) or MoLF-E (frozen base, LoRA experts of different ranks).

    `lora_ranks` / `lora_alphas` / `freeze_non_linear` default by variant when left as None.
    """

    variant: str = "molf"
    freeze_non_linear: bool | None = None
    lora_ranks: Sequence[int] | None = None
    lora_alphas: Sequence[float] | None = None
    use_rslora: bool = True
    lora_dropout: float = 0.1
    target_modules: Sequence[str] = DEFAULT_TARGETS
    exclude_modules: Sequence[str] = ()
    top_k: int = 1
    score: str = "epd"
    lr: float = 5e-5
    lora_lr: float = 5e-5
    weight_decay: float = 0.1
    lora_weight_decay: float = 0.01
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    log_every: int = field(default=1)
    # One pass over optimizer memory instead of two where routing keeps last step's winners (C++ CPU kernel: CPU
    # training and optimizer offload), for a backup of 4 bytes per MoLF parameter element; exact either way.
    speculative_update: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"MoLFConfig.variant={self.variant!r} is unknown: use one of {VARIANTS}")
        if self.freeze_non_linear is None:
            self.freeze_non_linear = self.variant == "molf-e"
        if self.lora_ranks is None:
            self.lora_ranks = _DEFAULT_RANKS[self.variant]
        self.lora_ranks = tuple(self.lora_ranks)
        if self.lora_alphas is None:
            self.lora_alphas = (32.0,) * len(self.lora_ranks)
        self.lora_alphas = tuple(float(a) for a in self.lora_alphas)
        self.target_modules = tuple(self.target_modules)
        self.exclude_modules = tuple(self.exclude_modules)
        self.betas = tuple(float(b) for b in self.betas)
        self._validate()

    def _validate(self) -> None:
        if not self.lora_ranks:
            raise ValueError("MoLFConfig.lora_ranks is empty: give at least one LoRA rank, e.g. lora_ranks=[128]")
        for r in self.lora_ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"MoLFConfig.lora_ranks has {r!r}: every rank must be an integer >= 1")
        if len(self.lora_alphas) != len(self.lora_ranks):
            raise ValueError(
                f"MoLFConfig.lora_alphas has {len(self.lora_alphas)} values but lora_ranks has "
                f"{len(self.lora_ranks)}: give one alpha per rank"
            )
        if self.variant == "molf-e" and len(self.lora_ranks) < 2:
            raise ValueError("MoLFConfig.lora_ranks: molf-e routes between LoRA experts, give at least two ranks")
        if self.score not in SCORE_NAMES:
            raise ValueError(f"MoLFConfig.score={self.score!r} is unknown: use one of {SCORE_NAMES}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"MoLFConfig.top_k={self.top_k!r} is outside [1, {self.n_experts}] "
                f"(the number of experts per module, {list(self.expert_names)})"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MoLFConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"MoLFConfig.betas={self.betas!r}: give two values in [0, 1), e.g. [0.9, 0.999]")
        for name in ("lr", "lora_lr", "weight_decay", "lora_weight_decay", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MoLFConfig.{name}={value!r} must be a finite number")
            if value < 0 or (value == 0 and name in ("lr", "lora_lr")):
                bound = "> 0 (the LR schedule scales it)" if name in ("lr", "lora_lr") else ">= 0"
                raise ValueError(f"MoLFConfig.{name}={value!r} must be {bound}")
        if not self.target_modules:
            raise ValueError("MoLFConfig.target_modules is empty: name at least one linear layer, e.g. ['q_proj']")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"MoLFConfig.log_every={self.log_every!r} must be an integer >= 1")
        if not isinstance(self.speculative_update, bool):
            raise ValueError(f"MoLFConfig.speculative_update={self.speculative_update!r} must be true or false")

    @property
    def trains_base(self) -> bool:
        return self.variant == "molf"

    @property
    def expert_names(self) -> tuple[str, ...]:
        loras = tuple(f"lora{i}" for i in range(len(self.lora_ranks)))
        return ("full",) + loras if self.trains_base else loras

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoLFConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoLFConfig has no field(s) {unknown}: valid fields are {sorted(known)}")
        return cls(**values)
