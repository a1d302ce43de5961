"""The methods the commands know, in one registry: what each one is and does (MoLF's optimizer routing or not, a
MoLF-wrapped model or not, training the base weights W of the target linears or not, which PEFT adapter it adds,
whether the parameters outside the adapters train, what its run's final_peft/ holds) and which command runs which.
The commands read these fields, never a method's name: `molf-ds train` builds them (train/methods.py: `build`,
`shaped_model`, `merged_model`) and saves them (train/outputs.py), `molf-ds eval` / `generate` rebuild a
checkpoint (loading.py), `molf-ds compare` runs several, `molf-ds estimate-memory` sizes them, `molf-ds bench`
times them. A new method is one row here (plus its name in the command tuples below)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Method:
    name: str
    molf: bool  # molf_ds.initialize: MoLFAdamW routes each module between its full weight and LoRA experts
    wrapped: bool  # the model's target linears are MoLFLinear (every `molf` method, and the bench's ds-adamw)
    trains_base: bool  # the target linears' own weights W train (frozen under LoRA-only methods)
    adapter: str | None  # the PEFT adapter a baseline adds to the target linears ("lora", "adalora"); None: none
    trains_rest: bool  # a PEFT baseline's parameters outside the adapters train at train.lr (as MoLF trains them)
    exports_peft: bool  # the run also writes final_peft/: the PEFT adapter (molf-e: its experts as a PEFT LoRA)
    about: str

    @property
    def peft(self) -> bool:
        """A PEFT baseline (LoRA / AdaLoRA adapters from the peft package)."""
        return self.adapter is not None

    @property
    def has_lora(self) -> bool:
        """Low-rank parameters on the target linears: MoLF's experts or a PEFT adapter (not FFT)."""
        return self.wrapped or self.peft


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fft", molf=False, wrapped=False, trains_base=True, adapter=None, trains_rest=False, exports_peft=False,
           about="full fine-tuning, torch AdamW"),
    Method("lora", molf=False, wrapped=False, trains_base=False, adapter="lora", trains_rest=False, exports_peft=True,
           about="PEFT LoRA on the target linears"),
    Method("lora-rest", molf=False, wrapped=False, trains_base=False, adapter="lora", trains_rest=True,
           exports_peft=True, about="PEFT LoRA on the target linears, every other weight trained in full"),
    Method("adalora", molf=False, wrapped=False, trains_base=False, adapter="adalora", trains_rest=False,
           exports_peft=True, about="PEFT AdaLoRA"),
    Method("molf", molf=True, wrapped=True, trains_base=True, adapter=None, trains_rest=False, exports_peft=False,
           about="MoLF: per module and step, the full weight or one of the LoRA experts"),
    Method("molf-e", molf=True, wrapped=True, trains_base=False, adapter=None, trains_rest=False, exports_peft=True,
           about="MoLF-E: LoRA experts only, W frozen"),
    Method("ds-adamw", molf=False, wrapped=True, trains_base=True, adapter=None, trains_rest=False,
           exports_peft=False,
           about="bench only: the molf-wrapped model with DeepSpeed's own AdamW (optimizer-step baseline)"),
)}

MOLF_METHODS = tuple(n for n, m in REGISTRY.items() if m.molf)  # ("molf", "molf-e")
MOLF_WRAPPED = tuple(n for n, m in REGISTRY.items() if m.wrapped)  # ("molf", "molf-e", "ds-adamw")
TRAIN_METHODS = ("molf", "molf-e", "fft", "lora", "lora-rest", "adalora")  # molf-ds train's `method:`
COMPARE_METHODS = ("fft", "lora", "lora-rest", "adalora", "molf", "molf-e")  # molf-ds compare's default order
EXPERT_BASELINES = ("lora", "lora-rest")  # molf-ds compare: their lora.* default to MoLF's own LoRA expert
MEMORY_METHODS = ("fft", "lora", "molf", "molf-e")  # molf-ds estimate-memory
BENCH_METHODS = ("fft", "lora", "molf", "molf-e")  # molf-ds bench's default
BENCH_EXTRA_METHODS = ("ds-adamw",)  # molf-ds bench, on request


def is_molf(method: str) -> bool:
    """Whether `method` is one of MoLF's (molf, molf-e): built by molf_ds.initialize, with a routing log."""
    return REGISTRY[method].molf if method in REGISTRY else False


def trains_base(method: str) -> bool:
    return REGISTRY[method].trains_base


def uses_lrs(method: str, freeze_non_linear: bool = False) -> tuple[bool, bool]:
    """(train.lr, train.lora_lr): which of the two lrs `method` trains with. train.lr goes to the full weights and
    to every parameter outside the adapters where those train (lora-rest; molf and molf-e unless
    molf.freeze_non_linear), train.lora_lr to the LoRA / AdaLoRA adapters and experts."""
    spec = REGISTRY[method]
    rest = spec.trains_rest or (spec.molf and not freeze_non_linear)
    return spec.trains_base or rest, spec.has_lora


DEGENERATE = 0.99  # a MoLF run where one expert took more of the routing decisions than this trained it alone


def lone_expert(decisions: Mapping[str, float]) -> str | None:
    """The expert that took more than DEGENERATE of the routing decisions, None where none did (`decisions`: per
    expert, its shares summed over any steps; under top_k > 1 a step's shares sum to k)."""
    if not decisions:
        return None
    winner = max(decisions, key=decisions.__getitem__)
    return winner if decisions[winner] > DEGENERATE * (sum(decisions.values()) or 1.0) else None


def baseline_of(method: str) -> str:
    """The method a method is measured against: LoRA for those that leave W frozen, FFT for the others."""
    return "fft" if REGISTRY[method].trains_base else "lora"
