"""The MoLF routing optimizer: the rule (routing.py), layouts, the step, the routing log."""
from .layout import ExpertIndex, Layout, ParamLayouts
from .molf_adamw import MoLFAdamW, Router, build_optimizer, param_groups
from .routing_log import RoutingLog

__all__ = ["ExpertIndex", "Layout", "ParamLayouts", "MoLFAdamW", "RoutingLog", "Router", "build_optimizer",
           "param_groups"]
