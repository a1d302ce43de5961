"""DeepSpeed integration: `initialize`, the layouts of DeepSpeed's flat tensors, checkpoints."""
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import initialize

__all__ = ["initialize", "load_checkpoint", "save_checkpoint"]
