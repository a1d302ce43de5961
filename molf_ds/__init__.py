"""molf_ds: MoLF (Mixture of LoRA and Full fine-tuning) routing optimizer at DeepSpeed scale."""
from .config import MoLFConfig
from .layers import MoLFLinear
from .optim import MoLFAdamW, build_optimizer
from .wrapping import merge_and_unwrap, molf_modules, wrap_model

__version__ = "0.1.0"
__all__ = ["MoLFConfig", "MoLFLinear", "MoLFAdamW", "build_optimizer", "merge_and_unwrap", "molf_modules", "wrap_model"]
