import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The Triton kernels (MOLF_DS_KERNEL=triton) run on CPU tensors under Triton's interpreter, read when they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# A C++ kernel that fails to build fails its tests (fast subset included) instead of skipping them; the child
# processes the tests start inherit it. A test of the users' fallback sets it to "0".
os.environ.setdefault("MOLF_DS_REQUIRE_CPP_KERNEL", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/: `helpers.*` imports whatever pytest's --import-mode
torch.set_num_threads(1)

from helpers.tiny_models import tiny_model  # noqa: E402


@pytest.fixture(params=["qwen2", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(arch, seed=0, **config overrides) -> model reloaded from disk."""
    counter = iter(range(1000))
    return lambda arch="qwen2", seed=0, **kw: tiny_model(arch, tmp_path / f"{arch}-{next(counter)}", seed, **kw)
