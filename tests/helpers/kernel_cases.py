"""The multi-tensor kernel cases shared by tests/test_kernels_multi.py and tests/test_speculative_update.py: three
flat tensors with their segment rows, the per-kind (routing.KINDS) learning rates and weight decays, random optimizer
states."""
from __future__ import annotations

import torch

BETAS = (0.9, 0.999)
# Three flat tensors: gaps, a chunk-crossing segment, two rows of one cell (A and B of an expert), a tensor
# without segments, single elements.
NUMELS = [200_003, 5_003, 70_001]
ROWS = [  # (tensor, offset, length, cell, kind)
    (0, 3, 70_000, 0, 0), (0, 70_010, 1, 0, 1), (0, 131_000, 69_001, 3, 2),
    (2, 0, 1, 3, 3), (2, 17, 50_000, 1, 2), (2, 50_017, 19_984, 2, 0),
]
N_CELLS = 5
KIND_LRS = torch.tensor([1e-3, 1e-3, 6e-4, 6e-4], dtype=torch.float64)
KIND_WDS = torch.tensor([0.1, 0.0, 0.01, 0.01], dtype=torch.float64)


def _tensors(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "p": [torch.randn(n, generator=gen) for n in NUMELS],
        "g": [torch.randn(n, generator=gen) * 1e-2 for n in NUMELS],
        "m": [torch.randn(n, generator=gen) * 1e-3 for n in NUMELS],
        "v": [torch.rand(n, generator=gen) * 1e-4 for n in NUMELS],
    }


def _clone(s):
    return {k: [t.clone() for t in ts] for k, ts in s.items()}
