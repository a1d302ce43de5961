"""molf_ds: MoLF (Mixture of LoRA and Full fine-tuning) routing optimizer at DeepSpeed scale."""
import contextlib as _contextlib
import sys as _sys

# DeepSpeed's logger writes to the sys.stdout of its import ("Setting accelerator to CPU" comes at import): imported
# here first, its notices go to stderr and stdout carries only what a program prints (a `molf-ds` command's result)
with _contextlib.redirect_stdout(_sys.stderr):
    import deepspeed as _deepspeed  # noqa: F401

from .config import MoLFConfig
from .layers import MoLFLinear
from .optim import MoLFAdamW, build_optimizer
from .wrapping import merge_and_unwrap, molf_modules, wrap_model
from .export import export_peft, merged_state_dict, save_merged
from .zero import initialize, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = [
    "MoLFConfig", "MoLFLinear", "MoLFAdamW", "build_optimizer", "export_peft", "initialize", "merge_and_unwrap",
    "merged_state_dict", "molf_modules", "save_merged", "wrap_model", "save_checkpoint", "load_checkpoint",
]
