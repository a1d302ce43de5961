"""`molf-ds train`: the end-to-end training job (config, tasks and data, methods, loop, outputs, demo)."""
from .config import ConfigError, TrainConfig, from_dict, load_config
from .loop import run

__all__ = ["ConfigError", "TrainConfig", "from_dict", "load_config", "run"]
