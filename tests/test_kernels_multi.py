"""Multi-tensor kernels (one call per param group and step) against the single-tensor kernels, bit for bit."""
from __future__ import annotations

import pytest
import torch

from molf_ds.optim import kernels
from molf_ds.optim.kernels import cpp_impl

from helpers.kernel_cases import BETAS, KIND_LRS, KIND_WDS, N_CELLS, NUMELS, ROWS, _clone, _tensors


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "cpp" and not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build")
    if request.param == "torch":
        monkeypatch.setenv("MOLF_DS_KERNEL", "torch")
    return request.param


@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_moments_and_scores_multi_equals_per_tensor(backend, score):
    a, b = _tensors(), _tensors()
    scale = KIND_LRS if score == "epd" else torch.ones(3, dtype=torch.float64)
    sums = kernels.ScoreSums(N_CELLS)
    kernels.moments_and_scores_multi(a["g"], a["m"], a["v"], kernels.SegmentTable(ROWS, NUMELS), scale, sums,
                                     *BETAS, score)
    want = torch.zeros(N_CELLS, dtype=torch.float64)
    for t in range(len(NUMELS)):
        rows = [r for r in ROWS if r[0] == t]
        offsets = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        lengths = torch.tensor([r[2] for r in rows], dtype=torch.int64)
        seg = kernels.moments_and_scores(b["g"][t], b["m"][t], b["v"][t], *BETAS, offsets, lengths, score)
        cells = torch.tensor([r[3] for r in rows], dtype=torch.int64)
        kinds = torch.tensor([r[4] for r in rows], dtype=torch.int64)
        want.index_add_(0, cells, seg * scale[kinds])
    assert torch.equal(sums.totals(), want)
    assert sums.took_part.tolist() == [True, True, True, True, False]
    for key in "mv":
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)


def test_update_winners_multi_equals_ranges(backend):
    a, b = _tensors(), _tensors()
    winners = torch.tensor([True, False, True, True, False])
    updated = kernels.update_winners_multi(a["p"], a["m"], a["v"], kernels.SegmentTable(ROWS, NUMELS), winners,
                                           KIND_LRS, KIND_WDS, 0.19, 0.002, 1e-8)
    assert updated == sum(r[2] for r in ROWS if winners[r[3]])
    for t in range(len(NUMELS)):
        for kind in range(3):
            rows = [r for r in ROWS if r[0] == t and r[4] == kind and winners[r[3]]]
            if rows:
                kernels.adamw_update_ranges(
                    b["p"][t], b["m"][t], b["v"][t], torch.tensor([r[1] for r in rows]),
                    torch.tensor([r[2] for r in rows]), KIND_LRS[kind].item(), KIND_WDS[kind].item(), 0.19, 0.002,
                    1e-8)
    for x, y in zip(a["p"], b["p"]):
        assert torch.equal(x, y)
    assert torch.equal(a["p"][1], _tensors()["p"][1])  # no segment: untouched


def test_adamw_step_multi_equals_per_tensor(backend):
    a, b = _tensors(), _tensors()
    kernels.adamw_step_multi(a["p"], a["g"], a["m"], a["v"], 1e-3, *BETAS, 1e-8, 0.1, 0.19, 0.002)
    for t in range(len(NUMELS)):
        kernels.adamw_step(b["p"][t], b["g"][t], b["m"][t], b["v"][t], 1e-3, *BETAS, 1e-8, 0.1, 0.19, 0.002)
    for key in "pmv":
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)


def test_multi_kernels_accept_empty_tables(backend):
    s = _tensors()
    table = kernels.SegmentTable([], NUMELS)
    sums = kernels.ScoreSums(N_CELLS)
    kernels.moments_and_scores_multi(s["g"], s["m"], s["v"], table, KIND_LRS, sums, *BETAS, "epd")
    assert not sums.totals().any() and not sums.took_part.any()
    assert kernels.update_winners_multi(s["p"], s["m"], s["v"], table, torch.ones(N_CELLS, dtype=torch.bool),
                                        KIND_LRS, KIND_WDS, 0.1, 0.1, 1e-8) == 0


@pytest.mark.parametrize("rows", [
    [(0, 10, 5, 0, 0), (0, 12, 5, 1, 0)],  # overlap
    [(1, 5_000, 4, 0, 0)],  # past the end of its tensor
    [(3, 0, 1, 0, 0)],  # no such tensor
])
def test_segment_table_rejects_bad_rows(rows):
    with pytest.raises(ValueError):
        kernels.SegmentTable(rows, NUMELS)


def test_cpp_checks_cells_and_kinds():
    if not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build")
    s = _tensors()
    table = kernels.SegmentTable([(0, 0, 10, N_CELLS, 0)], NUMELS)  # cell out of range
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.moments_and_scores_multi(s["g"], s["m"], s["v"], table, KIND_LRS, kernels.ScoreSums(N_CELLS),
                                         *BETAS, "epd")
    with pytest.raises(ValueError, match="other sizes"):
        kernels.moments_and_scores_multi(s["g"][:2], s["m"][:2], s["v"][:2], kernels.SegmentTable([], NUMELS),
                                         KIND_LRS, kernels.ScoreSums(N_CELLS), *BETAS, "epd")


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_route_cpp_equals_torch(top_k, score, monkeypatch):
    if not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build")
    gen = torch.Generator().manual_seed(top_k)
    modules, experts = 40, 3
    sums = torch.rand(modules * experts, generator=gen, dtype=torch.float64) * 1e-6
    sums[3:6] = 0.0  # a three-way tie: lower index first
    sums[7] = sums[8]  # a tie after division only where sizes agree
    sums[12] = float("nan")  # ranks first, as in torch.sort
    sizes = torch.randint(0, 50, (modules, experts), generator=gen).double()
    sizes[2, :] = 10.0
    took = torch.rand(modules * experts, generator=gen) > 0.2
    took[15:18] = False  # a module where nobody took part: no winner
    got = kernels.route(sums, sizes, took, experts, top_k, score)
    monkeypatch.setenv("MOLF_DS_KERNEL", "torch")
    want = kernels.route(sums, sizes, took, experts, top_k, score)
    assert torch.equal(got[0].isnan(), want[0].isnan())
    assert torch.equal(got[0].nan_to_num(), want[0].nan_to_num())
    assert torch.equal(got[1], want[1])
    assert not got[1][5].any() and got[1][1].tolist()[0] is True  # module 1: experts 0-2 tie at zero
