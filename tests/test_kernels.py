"""The element-wise MoLF kernels: C++ and torch backends against a plain reference."""

from __future__ import annotations

import math

import pytest
import torch

from molf_ds.optim import kernels
from molf_ds.optim.kernels import cpp_impl, torch_impl

BETAS = (0.9, 0.999)
HYPER = dict(lr=1e-3, weight_decay=0.1, eps=1e-8)
BACKENDS = ["cpp", "torch"]

# name -> (numel, [(offset, length), ...]): gaps, chunk-crossing, empty and tiny segments.
LAYOUTS = {
    "gaps": (200_003, [(3, 70_000), (70_010, 1), (70_011, 0), (131_000, 69_001)]),
    "whole": (131_075, [(0, 131_075)]),
    "single_elements": (1_001, [(0, 1), (17, 1), (1_000, 1)]),
    "no_segments": (5_003, []),
    "tiny_tensor": (7, [(2, 3)]),
}


def _impl(name: str):
    if name == "cpp" and not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build (see the warning): torch path only")
    return cpp_impl if name == "cpp" else torch_impl


def _segments(layout: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([o for o, _ in layout], dtype=torch.int64)
    lengths = torch.tensor([n for _, n in layout], dtype=torch.int64)
    return offsets, lengths


def _state(numel: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "param": torch.randn(numel, generator=gen),
        "grad": torch.randn(numel, generator=gen) * 1e-2,
        "exp_avg": torch.randn(numel, generator=gen) * 1e-3,
        "exp_avg_sq": torch.rand(numel, generator=gen) * 1e-4,
    }


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in state.items()}


def _reference_scores(s: dict[str, torch.Tensor], layout, score: str, eps_s: float = 1e-8) -> torch.Tensor:
    """The spec, plainly: moments over the whole tensor, then q summed per segment in double."""
    s["exp_avg"].lerp_(s["grad"], 1 - BETAS[0])
    s["exp_avg_sq"].mul_(BETAS[1]).addcmul_(s["grad"], s["grad"], value=1 - BETAS[1])
    denom = s["exp_avg_sq"].sqrt() + eps_s
    m = s["exp_avg"]
    q = m * m / denom if score == "epd" else (m / denom) ** 2
    return torch.tensor([q[o : o + n].double().sum().item() for o, n in layout], dtype=torch.float64)


def _reference_update(s: dict[str, torch.Tensor], layout, bc1: float, bc2: float) -> None:
    lr, wd, eps = HYPER["lr"], HYPER["weight_decay"], HYPER["eps"]
    for o, n in layout:
        p, m, v = (s[k][o : o + n] for k in ("param", "exp_avg", "exp_avg_sq"))
        p.mul_(1 - lr * wd)
        p.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(eps), value=-lr / bc1)


def _assert_state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["epd", "pfn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_moments_and_scores(backend: str, score: str, layout: str) -> None:
    impl = _impl(backend)
    numel, segs = LAYOUTS[layout]
    ours, ref = _state(numel), _state(numel)
    got = impl.moments_and_scores(
        ours["grad"], ours["exp_avg"], ours["exp_avg_sq"], *BETAS, *_segments(segs), score
    )
    want = _reference_scores(ref, segs, score)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (len(segs),)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    _assert_state_close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adamw_update_ranges(backend: str, layout: str) -> None:
    impl = _impl(backend)
    numel, segs = LAYOUTS[layout]
    ours, ref = _state(numel), _state(numel)
    bc1, bc2 = 1 - BETAS[0] ** 3, 1 - BETAS[1] ** 3
    before = ours["param"].clone()
    impl.adamw_update_ranges(
        ours["param"], ours["exp_avg"], ours["exp_avg_sq"], *_segments(segs),
        HYPER["lr"], HYPER["weight_decay"], bc1, bc2, HYPER["eps"],
    )
    _reference_update(ref, segs, bc1, bc2)
    _assert_state_close(ours, ref)
    outside = torch.ones(numel, dtype=torch.bool)
    for o, n in segs:
        outside[o : o + n] = False
    assert torch.equal(ours["param"][outside], before[outside])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_step_matches_torch_adamw(backend: str) -> None:
    impl = _impl(backend)
    numel = 100_003
    param = torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(0)))
    p, m, v = param.detach().clone(), torch.zeros(numel), torch.zeros(numel)
    opt = torch.optim.AdamW([param], betas=BETAS, foreach=False, **HYPER)
    for t in range(1, 4):
        param.grad = torch.randn(numel, generator=torch.Generator().manual_seed(t)) * 1e-2
        opt.step()
        impl.adamw_step(
            p, param.grad, m, v, HYPER["lr"], *BETAS, HYPER["eps"], HYPER["weight_decay"],
            1 - BETAS[0] ** t, 1 - BETAS[1] ** t,
        )
    state = opt.state[param]
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(p, param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_dim_tensors_index_flat(backend: str) -> None:
    """Without ZeRO a parameter is its own segment source: offsets index its flat elements."""
    impl = _impl(backend)
    segs = [(5, 30), (40, 17)]
    ours, ref = _state(77), _state(77)
    shaped = {k: t.view(7, 11) for k, t in ours.items()}
    got = impl.moments_and_scores(
        shaped["grad"], shaped["exp_avg"], shaped["exp_avg_sq"], *BETAS, *_segments(segs), "epd"
    )
    torch.testing.assert_close(got, _reference_scores(ref, segs, "epd"), rtol=1e-6, atol=0.0)
    impl.adamw_update_ranges(
        shaped["param"], shaped["exp_avg"], shaped["exp_avg_sq"], *_segments(segs),
        HYPER["lr"], HYPER["weight_decay"], 0.1, 0.001, HYPER["eps"],
    )
    _reference_update(ref, segs, 0.1, 0.001)
    _assert_state_close(ours, ref)


def test_torch_path_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments split into pieces and pieces grouped into batches give the same sums."""
    monkeypatch.setattr(torch_impl, "CHUNK", 1_000)
    numel, segs = LAYOUTS["gaps"]
    segs = segs + [(200_000, 3)]
    ours, ref = _state(numel), _state(numel)
    got = torch_impl.moments_and_scores(
        ours["grad"], ours["exp_avg"], ours["exp_avg_sq"], *BETAS, *_segments(segs), "epd"
    )
    torch.testing.assert_close(got, _reference_scores(ref, segs, "epd"), rtol=1e-6, atol=0.0)
    bc1, bc2 = 1 - BETAS[0], 1 - BETAS[1]
    torch_impl.adamw_update_ranges(
        ours["param"], ours["exp_avg"], ours["exp_avg_sq"], *_segments(segs),
        HYPER["lr"], HYPER["weight_decay"], bc1, bc2, HYPER["eps"],
    )
    _reference_update(ref, segs, bc1, bc2)
    _assert_state_close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_deterministic(backend: str) -> None:
    impl = _impl(backend)
    numel, segs = LAYOUTS["gaps"]
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            s = _state(numel)
            scores = impl.moments_and_scores(
                s["grad"], s["exp_avg"], s["exp_avg_sq"], *BETAS, *_segments(segs), "pfn"
            )
            results.append(scores)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(10)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    expected = "cpp" if cpp_impl.load() else "torch"
    assert kernels.backend(x, x) == expected
    assert kernels.backend(x, x.double()) == "torch"
    assert kernels.backend(x, torch.zeros(10, 2)[:, 0]) == "torch"  # not contiguous
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.backend(x, x) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.backend(x, x)


def test_build_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def broken(**_kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(UserWarning, match="torch path"):
        assert cpp_impl.load.__wrapped__() is False
    monkeypatch.setattr(cpp_impl, "load", lambda: False)
    assert kernels.backend(torch.zeros(3)) == "torch"


def test_env_var_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    numel, segs = LAYOUTS["gaps"]
    ours, ref = _state(numel), _state(numel)
    got = kernels.moments_and_scores(
        ours["grad"], ours["exp_avg"], ours["exp_avg_sq"], *BETAS, *_segments(segs), "epd"
    )
    want = torch_impl.moments_and_scores(
        ref["grad"], ref["exp_avg"], ref["exp_avg_sq"], *BETAS, *_segments(segs), "epd"
    )
    assert torch.equal(got, want)
    _assert_state_close(ours, ref)


def test_public_functions_match_backends() -> None:
    numel, segs = LAYOUTS["gaps"]
    ours, ref = _state(numel), _state(numel)
    got = kernels.moments_and_scores(
        ours["grad"], ours["exp_avg"], ours["exp_avg_sq"], *BETAS, *_segments(segs), "epd"
    )
    torch.testing.assert_close(got, _reference_scores(ref, segs, "epd"), rtol=1e-6, atol=0.0)
    kernels.adamw_update_ranges(
        ours["param"], ours["exp_avg"], ours["exp_avg_sq"], *_segments(segs),
        HYPER["lr"], HYPER["weight_decay"], 0.1, 0.001, HYPER["eps"],
    )
    _reference_update(ref, segs, 0.1, 0.001)
    _assert_state_close(ours, ref)


def test_non_fp32_takes_torch_path() -> None:
    numel, segs = LAYOUTS["gaps"]
    ours = {k: t.double() for k, t in _state(numel).items()}
    ref = _clone(ours)
    assert kernels.backend(ours["grad"]) == "torch"
    got = kernels.moments_and_scores(
        ours["grad"], ours["exp_avg"], ours["exp_avg_sq"], *BETAS, *_segments(segs), "pfn"
    )
    torch.testing.assert_close(got, _reference_scores(ref, segs, "pfn"), rtol=1e-6, atol=0.0)
    _assert_state_close(ours, ref)


@pytest.mark.parametrize(
    "segs", [[(10, 5), (12, 5)], [(10, 5), (0, 2)], [(95, 10)], [(-1, 2)], [(3, -1)]],
    ids=["overlap", "unsorted", "past_end", "negative_offset", "negative_length"],
)
def test_bad_segments_rejected(segs: list[tuple[int, int]]) -> None:
    s = _state(100)
    with pytest.raises(ValueError, match="segments"):
        kernels.moments_and_scores(s["grad"], s["exp_avg"], s["exp_avg_sq"], *BETAS, *_segments(segs), "epd")


def test_bad_arguments_rejected() -> None:
    s = _state(100)
    segs = _segments([(0, 10)])
    with pytest.raises(ValueError, match="score"):
        kernels.moments_and_scores(s["grad"], s["exp_avg"], s["exp_avg_sq"], *BETAS, *segs, "l2")
    with pytest.raises(ValueError, match="size"):
        kernels.moments_and_scores(s["grad"][:50], s["exp_avg"], s["exp_avg_sq"], *BETAS, *segs, "epd")
    transposed = {k: t.view(10, 10).t() for k, t in s.items()}
    with pytest.raises(ValueError, match="contiguous"):
        kernels.moments_and_scores(
            transposed["grad"], transposed["exp_avg"], transposed["exp_avg_sq"], *BETAS, *segs, "epd"
        )
