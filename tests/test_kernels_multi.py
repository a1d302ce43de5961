"""Multi-tensor kernels: one call over several tensors is, bit for bit, one call per tensor; the routing rule."""
from __future__ import annotations

import math

import pytest
import torch

from molf_ds.optim import kernels, routing
from molf_ds.optim.kernels import cpp_impl
from molf_ds.scores import SCORE_NAMES, score_named

from helpers.kernel_cases import BETAS, KIND_LRS, KIND_WDS, N_CELLS, NUMELS, ROWS, _tensors


@pytest.fixture(params=["cpp", "triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "cpp" and not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build")
    if request.param != "cpp":
        monkeypatch.setenv("MOLF_DS_KERNEL", request.param)
    return request.param


def _per_tensor(t: int, rows=ROWS) -> kernels.SegmentTable:
    """Tensor t's rows, as the table of a call on that tensor alone."""
    return kernels.SegmentTable([(0, *r[1:]) for r in rows if r[0] == t], [NUMELS[t]])


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_moments_and_scores_multi_equals_per_tensor(backend, score):
    a, b = _tensors(), _tensors()
    scale = KIND_LRS if score_named(score).carries_lr else torch.ones(len(KIND_LRS), dtype=torch.float64)
    sums = kernels.ScoreSums(N_CELLS, routing.kind_columns(score))
    kernels.moments_and_scores_multi(a["p"], a["g"], a["m"], a["v"], kernels.SegmentTable(ROWS, NUMELS), scale, sums,
                                     *BETAS, score)
    want = kernels.ScoreSums(N_CELLS, routing.kind_columns(score))
    for t in range(len(NUMELS)):
        kernels.moments_and_scores_multi([b["p"][t]], [b["g"][t]], [b["m"][t]], [b["v"][t]], _per_tensor(t), scale,
                                         want, *BETAS, score)
    assert torch.equal(sums.totals(), want.totals())
    assert sums.totals().shape == (N_CELLS, score_named(score).width)
    assert sums.took_part.tolist() == [True, True, True, True, False]
    for key in "pmv":
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)


def test_ldw_sums_by_role(backend):
    """LDW's table against the rows summed plainly: sum(m*u) of every row in column 0, sum(u^2) and sum(p^2) (p
    before the step) in the columns of the row's role (routing.KINDS: full and its bias, LoRA A, LoRA B)."""
    s, ref = _tensors(), _tensors()
    sums = kernels.ScoreSums(N_CELLS, routing.kind_columns("ldw"))
    kernels.moments_and_scores_multi(s["p"], s["g"], s["m"], s["v"], kernels.SegmentTable(ROWS, NUMELS),
                                     torch.ones(len(KIND_LRS), dtype=torch.float64), sums, *BETAS, "ldw")
    want = torch.zeros(N_CELLS, 7, dtype=torch.float64)
    for tensor, offset, length, cell, kind in ROWS:
        p, g, m, v = (ref[k][tensor][offset:offset + length] for k in "pgmv")
        m, v = m * BETAS[0] + (1 - BETAS[0]) * g, v * BETAS[1] + (1 - BETAS[1]) * g * g
        u = m.double() / (v.double().sqrt() + 1e-8)
        role = routing.KINDS[kind].role
        want[cell, 0] += (m.double() * u).sum()
        want[cell, 1 + 2 * role] += (u * u).sum()
        want[cell, 2 + 2 * role] += (p.double() ** 2).sum()
    torch.testing.assert_close(sums.totals(), want, rtol=1e-5, atol=0.0)
    assert not sums.totals()[[0, 2], 3:].any() and not sums.totals()[[1, 3], 1:3].any()  # full vs LoRA cells
    assert all(torch.equal(x, y) for x, y in zip(s["p"], ref["p"]))  # read, not written


def test_update_winners_multi_equals_per_tensor(backend):
    a, b = _tensors(), _tensors()
    winners = torch.tensor([True, False, True, True, False])
    updated = kernels.update_winners_multi(a["p"], a["m"], a["v"], kernels.SegmentTable(ROWS, NUMELS), winners,
                                           KIND_LRS, KIND_WDS, 0.19, 0.002, 1e-8)
    assert updated == sum(r[2] for r in ROWS if winners[r[3]])
    for t in range(len(NUMELS)):
        for kind in range(len(KIND_LRS)):  # one call per tensor and kind, on the winning rows only
            rows = [r for r in ROWS if r[0] == t and r[4] == kind and winners[r[3]]]
            kernels.update_winners_multi([b["p"][t]], [b["m"][t]], [b["v"][t]], _per_tensor(t, rows), winners,
                                         KIND_LRS, KIND_WDS, 0.19, 0.002, 1e-8)
    for x, y in zip(a["p"], b["p"]):
        assert torch.equal(x, y)
    assert torch.equal(a["p"][1], _tensors()["p"][1])  # no segment: untouched


def test_adamw_step_multi_equals_per_tensor(backend):
    a, b = _tensors(), _tensors()
    kernels.adamw_step_multi(a["p"], a["g"], a["m"], a["v"], 1e-3, *BETAS, 1e-8, 0.1, 0.19, 0.002)
    for t in range(len(NUMELS)):
        kernels.adamw_step_multi([b["p"][t]], [b["g"][t]], [b["m"][t]], [b["v"][t]], 1e-3, *BETAS, 1e-8, 0.1, 0.19,
                                 0.002)
    for key in "pmv":
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)


def test_multi_kernels_accept_empty_tables(backend):
    s = _tensors()
    table = kernels.SegmentTable([], NUMELS)
    sums = kernels.ScoreSums(N_CELLS)
    kernels.moments_and_scores_multi(s["p"], s["g"], s["m"], s["v"], table, KIND_LRS, sums, *BETAS, "epd")
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
        kernels.moments_and_scores_multi(s["p"], s["g"], s["m"], s["v"], table, KIND_LRS, kernels.ScoreSums(N_CELLS),
                                         *BETAS, "epd")
    with pytest.raises(ValueError, match="other sizes"):
        kernels.moments_and_scores_multi(s["p"][:2], s["g"][:2], s["m"][:2], s["v"][:2],
                                         kernels.SegmentTable([], NUMELS), KIND_LRS, kernels.ScoreSums(N_CELLS),
                                         *BETAS, "epd")
    with pytest.raises(ValueError, match=r"3 channels per element: ScoreSums needs as many columns per kind, has 1"):
        kernels.moments_and_scores_multi(s["p"], s["g"], s["m"], s["v"], kernels.SegmentTable([], NUMELS), KIND_LRS,
                                         kernels.ScoreSums(N_CELLS), *BETAS, "ldw")


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_route_ties_nan_and_absent_experts(top_k, score):
    """routing.module_scores and top_k against a plain per-module loop: ties to the lower index, NaN ranks first (as
    in torch.sort), no winner among experts that took no part."""
    gen = torch.Generator().manual_seed(top_k)
    modules, experts = 40, 3
    sums = torch.rand(modules * experts, generator=gen, dtype=torch.float64) * 1e-6
    sums[3:6] = 0.0  # a three-way tie: lower index first
    sums[7] = sums[8]  # a tie after division only where sizes agree
    sums[12] = float("nan")
    sizes = torch.randint(0, 50, (modules, experts), generator=gen).double()
    sizes[2, :] = 10.0
    took = torch.rand(modules * experts, generator=gen) > 0.2
    took[15:18] = False  # a module where nobody took part: no winner
    scores = routing.module_scores(sums, sizes, torch.ones_like(sizes), took, score)
    winners = routing.top_k(scores, took, top_k)
    for m in range(modules):
        row = [sums[m * experts + e].item() / max(sizes[m, e].item(), 1.0) for e in range(experts)]
        row = [x if score == "epd" else math.sqrt(x) for x in row]
        row = [x if took[m * experts + e] else -math.inf for e, x in enumerate(row)]
        torch.testing.assert_close(scores[m], torch.tensor(row, dtype=torch.float64), rtol=1e-14, atol=0.0,
                                   equal_nan=True)
        ranked = sorted(range(experts), key=lambda e: (not math.isnan(row[e]), -row[e] if row[e] == row[e] else 0, e))
        want = [e in ranked[:top_k] and bool(took[m * experts + e]) for e in range(experts)]
        assert winners[m].tolist() == want, m
    assert not winners[5].any() and winners[1].tolist()[0] is True  # module 1: experts 0-2 tie at zero


@pytest.mark.slow  # about 40 s: a few hundred interpreted Triton programs
def test_triton_launches_per_step_do_not_grow_with_layers(tiny, monkeypatch):
    """Without ZeRO every parameter is its own tensor, yet one call per param group covers them all: the same Triton
    launches per step for 2 layers as for 8 (ZeRO-2 on 2 ranks: tests/test_triton_zero.py)."""
    import molf_ds
    from helpers.triton_runs import count_triton_launches

    monkeypatch.setenv("MOLF_DS_KERNEL", "triton")
    cfg = molf_ds.MoLFConfig(lora_ranks=(4,), lora_dropout=0.0)
    per_step = []
    for layers in (2, 8):
        model = molf_ds.wrap_model(tiny("qwen2", num_hidden_layers=layers), cfg)
        optimizer = molf_ds.build_optimizer(model, cfg)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        with count_triton_launches() as launches:
            optimizer.step()
        per_step.append(dict(launches))
        assert optimizer.kernel_backend == "triton"
    assert per_step[0] == per_step[1] == {"_moments_scores": 1, "_cell_sums": 1, "_update": 1, "_adamw": 2}, per_step
