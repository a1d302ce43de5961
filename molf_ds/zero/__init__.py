"""DeepSpeed integration: `initialize` and `prepare`, one adapter per DeepSpeed optimizer wrapper, checkpoints."""
from .adapters import attach
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import initialize, prepare

__all__ = ["attach", "initialize", "load_checkpoint", "prepare", "save_checkpoint"]
