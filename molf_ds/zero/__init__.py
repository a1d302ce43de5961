"""DeepSpeed integration: `initialize`, the layouts of DeepSpeed's flat tensors, merged saving."""
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import initialize, save_merged

__all__ = ["initialize", "load_checkpoint", "save_checkpoint", "save_merged"]
