"""Real multi-process runs for tests: spawn ranks on CPU (gloo), count collectives (helpers live in benchmarks.lab)."""
from __future__ import annotations

import pytest
from deepspeed.accelerator import get_accelerator

from benchmarks.lab.collectives import COLLECTIVES, count_collectives
from benchmarks.lab.procs import free_port, spawn

# DeepSpeed refuses fp16 on a CPU whose oneDNN has no fp16 kernels (no AVX512-FP16 / AMX-FP16): nothing to test there
FP16_SUPPORTED = bool(get_accelerator().is_fp16_supported())
needs_fp16 = pytest.mark.skipif(not FP16_SUPPORTED, reason="DeepSpeed: fp16 is not supported on this CPU")

__all__ = ["COLLECTIVES", "FP16_SUPPORTED", "count_collectives", "free_port", "needs_fp16", "spawn"]
