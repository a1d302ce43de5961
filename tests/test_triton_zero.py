"""The Triton kernels (MOLF_DS_KERNEL=triton, interpreted on CPU) under DeepSpeed on 2 CPU ranks: ZeRO-2 and ZeRO-3
reproduce the single-process run on the C++ kernel (winners at every step, scores, merged weights), and the Triton
launches of an optimizer step do not grow with the number of layers."""
from __future__ import annotations

import pytest
import torch

from helpers.distributed import spawn
from helpers.tiny_models import token_batches
from helpers.triton_runs import TRITON_ENV, launches_per_step
from helpers.zero_runs import GLOBAL_BATCH, MOLF, SEQ, STEPS, assert_reproduces, deepspeed_worker, reference_run

pytestmark = pytest.mark.slow  # 2 spawned ranks each


def zero(stage: int, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage, **extra}}


RUNS = {"zero2": {"ds": zero(2)}, "zero3": {"ds": zero(3, stage3_param_persistence_threshold=0)}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from helpers.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("triton-zero")
    tiny_model("qwen2", root / "model", seed=1, num_hidden_layers=3)  # odd: the rank boundary cuts a layer
    batches = token_batches(STEPS, GLOBAL_BATCH, SEQ, seed=2)
    reference = reference_run(root / "model", MOLF, batches)  # this process: the C++ kernel
    spawn(deepspeed_worker, 2, str(root / "model"), MOLF, RUNS, batches, str(root), env=TRITON_ENV)
    return reference, [torch.load(root / f"rank{r}.pt") for r in range(2)], root


@pytest.mark.parametrize("run", list(RUNS))
def test_triton_reproduces_cpp_reference(runs, run):
    reference, ranks, root = runs
    assert_reproduces(reference, [rank[run] for rank in ranks], run, root)


def test_launches_per_step_do_not_grow_with_layers(tmp_path):
    """ZeRO-2 steps one flat partition per param group: the same launches per step for 2 layers as for 8 (moments and
    scores, cell sums and the winners' update for the MoLF group; one AdamW launch per plain group)."""
    from helpers.tiny_models import tiny_model

    dirs = [str(tmp_path / f"layers{n}") for n in (2, 8)]
    for n, directory in zip((2, 8), dirs):
        tiny_model("qwen2", directory, seed=1, num_hidden_layers=n)
    batches = token_batches(2, GLOBAL_BATCH, SEQ, seed=2)
    spawn(launches_per_step, 2, dirs, zero(2), MOLF, batches, str(tmp_path), env=TRITON_ENV)
    for rank in range(2):
        got = torch.load(tmp_path / f"launches{rank}.pt")
        small, large = (got[d] for d in dirs)
        assert small["backend"] == large["backend"] == "triton"
        want = {"_moments_scores": 1, "_cell_sums": 1, "_update": 1, "_adamw": 2}
        assert small["launches"] == large["launches"] == [want, want], (small, large)
