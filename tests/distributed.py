"""Real multi-process runs for tests: spawn ranks on CPU (gloo), count collectives (helpers live in molf_ds.bench)."""
from __future__ import annotations

from molf_ds.bench.collectives import COLLECTIVES, count_collectives
from molf_ds.bench.procs import free_port, spawn

__all__ = ["COLLECTIVES", "count_collectives", "free_port", "spawn"]
