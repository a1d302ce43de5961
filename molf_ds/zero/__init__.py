"""DeepSpeed integration: `initialize`, the layouts of DeepSpeed's flat tensors, merged saving."""
from .engine import initialize, save_merged

__all__ = ["initialize", "save_merged"]
