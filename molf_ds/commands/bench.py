"""MoLF's step time, memory and collectives against FFT and LoRA, per ZeRO stage (`molf-ds bench`)."""
from molf_ds.bench import add_arguments, run

__all__ = ["add_arguments", "run"]
