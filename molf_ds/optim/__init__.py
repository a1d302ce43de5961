"""The MoLF routing optimizer: layouts, the step, the routing log."""
from .layout import ExpertIndex, Layout, ParamLayouts
from .molf_adamw import MoLFAdamW, build_optimizer, param_groups
from .routing_log import RoutingLog

__all__ = ["ExpertIndex", "Layout", "ParamLayouts", "MoLFAdamW", "RoutingLog", "build_optimizer", "param_groups"]
