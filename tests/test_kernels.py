"""The element-wise MoLF kernels on one tensor: C++, Triton (interpreted, on CPU) and torch backends against a plain
reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from molf_ds.optim import kernels, routing
from molf_ds.optim.kernels import cpp_impl, torch_impl
from molf_ds.scores import SCORE_NAMES

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.9, 0.999)
HYPER = dict(lr=1e-3, weight_decay=0.1, eps=1e-8)
BACKENDS = ["cpp", "triton", "torch"]
ONE = torch.ones(1, dtype=torch.float64)  # score scale of the one kind used here
LR = torch.tensor([HYPER["lr"]], dtype=torch.float64)
WD = torch.tensor([HYPER["weight_decay"]], dtype=torch.float64)

# name -> (numel, [(offset, length), ...]): gaps, chunk-crossing, empty and tiny segments.
LAYOUTS = {
    "gaps": (200_003, [(3, 70_000), (70_010, 1), (70_011, 0), (131_000, 69_001)]),
    "whole": (131_075, [(0, 131_075)]),
    "single_elements": (1_001, [(0, 1), (17, 1), (1_000, 1)]),
    "no_segments": (5_003, []),
    "tiny_tensor": (7, [(2, 3)]),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    if request.param == "cpp" and not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build (see the warning): torch path only")
    if request.param != "cpp":
        monkeypatch.setenv(kernels.ENV_VAR, request.param)
    return request.param


def _table(numel: int, layout: list[tuple[int, int]]) -> kernels.SegmentTable:
    """One tensor, one cell per segment, all of kind 0."""
    return kernels.SegmentTable([(0, o, n, cell, 0) for cell, (o, n) in enumerate(layout)], [numel])


def _scores(s: dict[str, torch.Tensor], layout, score: str) -> torch.Tensor:
    """Moments of the whole tensor and the score table of its segments (each the full weight, kind 0), through the
    public multi-tensor kernel."""
    sums = kernels.ScoreSums(len(layout), routing.kind_columns(score)[:1])
    kernels.moments_and_scores_multi([s["param"]], [s["grad"]], [s["exp_avg"]], [s["exp_avg_sq"]],
                                     _table(s["grad"].numel(), layout), ONE, sums, *BETAS, score)
    return sums.totals()


def _update(s: dict[str, torch.Tensor], layout, bc1: float, bc2: float) -> None:
    """The AdamW update inside every segment (all winners)."""
    kernels.update_winners_multi([s["param"]], [s["exp_avg"]], [s["exp_avg_sq"]], _table(s["param"].numel(), layout),
                                 torch.ones(len(layout), dtype=torch.bool), LR, WD, bc1, bc2, HYPER["eps"])


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
    """The spec, plainly: moments over the whole tensor, then each channel summed per segment in double (LDW: m*u,
    u^2 and p^2 of the weight before the step, u = m / (sqrt(v) + eps_s))."""
    s["exp_avg"].lerp_(s["grad"], 1 - BETAS[0])
    s["exp_avg_sq"].mul_(BETAS[1]).addcmul_(s["grad"], s["grad"], value=1 - BETAS[1])
    denom = s["exp_avg_sq"].sqrt() + eps_s
    m = s["exp_avg"]
    u = m / denom
    qs = {"epd": [m * m / denom], "pfn": [u * u], "ldw": [m * u, u * u, s["param"] ** 2]}[score]
    return torch.tensor([[q[o : o + n].double().sum().item() for q in qs] for o, n in layout],
                        dtype=torch.float64).view(len(layout), len(qs))


def _reference_update(s: dict[str, torch.Tensor], layout, bc1: float, bc2: float) -> None:
    lr, wd, eps = HYPER["lr"], HYPER["weight_decay"], HYPER["eps"]
    for o, n in layout:
        p, m, v = (s[k][o : o + n] for k in ("param", "exp_avg", "exp_avg_sq"))
        p.mul_(1 - lr * wd)
        p.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(eps), value=-lr / bc1)


def _assert_state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("score", SCORE_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_moments_and_scores(backend: str, score: str, layout: str) -> None:
    numel, segs = LAYOUTS[layout]
    ours, ref = _state(numel), _state(numel)
    got = _scores(ours, segs, score)
    want = _reference_scores(ref, segs, score)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    _assert_state_close(ours, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_winners(backend: str, layout: str) -> None:
    numel, segs = LAYOUTS[layout]
    ours, ref = _state(numel), _state(numel)
    bc1, bc2 = 1 - BETAS[0] ** 3, 1 - BETAS[1] ** 3
    before = ours["param"].clone()
    _update(ours, segs, bc1, bc2)
    _reference_update(ref, segs, bc1, bc2)
    _assert_state_close(ours, ref)
    outside = torch.ones(numel, dtype=torch.bool)
    for o, n in segs:
        outside[o : o + n] = False
    assert torch.equal(ours["param"][outside], before[outside])


def _against_torch_adamw(numel: int, step: Callable[..., None]) -> tuple[torch.Tensor, ...]:
    """3 steps of `step(p, grad, m, v, t)` beside torch's AdamW on the same gradients: (p, m, v, torch's param,
    its exp_avg, its exp_avg_sq)."""
    param = torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(0)))
    p, m, v = param.detach().clone(), torch.zeros(numel), torch.zeros(numel)
    opt = torch.optim.AdamW([param], betas=BETAS, foreach=False, **HYPER)
    for t in range(1, 4):
        param.grad = torch.randn(numel, generator=torch.Generator().manual_seed(t)) * 1e-2
        opt.step()
        step(p, param.grad, m, v, t)
    return p, m, v, param.detach(), opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"]


def test_adamw_step_matches_torch_adamw(backend: str) -> None:
    def step(p, grad, m, v, t):
        kernels.adamw_step_multi([p], [grad], [m], [v], HYPER["lr"], *BETAS, HYPER["eps"], HYPER["weight_decay"],
                                 1 - BETAS[0] ** t, 1 - BETAS[1] ** t)

    p, m, v, want_p, want_m, want_v = _against_torch_adamw(100_003, step)
    torch.testing.assert_close(m, want_m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v, want_v, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(p, want_p, rtol=1e-6, atol=1e-7)


def test_triton_path_fused_adamw_step() -> None:
    """On CUDA the Triton backend's plain AdamW is torch's fused one, which takes the step t: t recovered from the
    bias corrections, and the call, against torch's AdamW (the fused op runs on CPU too)."""
    from molf_ds.optim.kernels import triton_impl

    assert triton_impl._fused_step(*BETAS, 1 - BETAS[0] ** 7, 1 - BETAS[1] ** 7) == 7
    assert triton_impl._fused_step(*BETAS, 0.19, 0.002) is None  # not a step's: the Triton kernel runs

    def step(p, grad, m, v, t):
        triton_impl.fused_adamw([p], [grad], [m], [v], t, HYPER["lr"], *BETAS, HYPER["eps"], HYPER["weight_decay"])

    p, _, _, want_p, _, _ = _against_torch_adamw(10_007, step)
    torch.testing.assert_close(p, want_p, rtol=1e-6, atol=1e-7)


def test_multi_dim_tensors_index_flat(backend: str) -> None:
    """Without ZeRO a parameter is its own segment source: offsets index its flat elements."""
    segs = [(5, 30), (40, 17)]
    ours, ref = _state(77), _state(77)
    shaped = {k: t.view(7, 11) for k, t in ours.items()}
    got = _scores(shaped, segs, "epd")
    torch.testing.assert_close(got, _reference_scores(ref, segs, "epd"), rtol=1e-6, atol=0.0)
    _update(shaped, segs, 0.1, 0.001)
    _reference_update(ref, segs, 0.1, 0.001)
    _assert_state_close(ours, ref)


def test_torch_path_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments split into pieces and pieces grouped into batches give the same sums."""
    monkeypatch.setattr(torch_impl, "CHUNK", 1_000)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    numel, segs = LAYOUTS["gaps"]
    segs = segs + [(200_001, 2)]
    ours, ref = _state(numel), _state(numel)
    got = _scores(ours, segs, "epd")
    torch.testing.assert_close(got, _reference_scores(ref, segs, "epd"), rtol=1e-6, atol=0.0)
    bc1, bc2 = 1 - BETAS[0], 1 - BETAS[1]
    _update(ours, segs, bc1, bc2)
    _reference_update(ref, segs, bc1, bc2)
    _assert_state_close(ours, ref)


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_triton_small_blocks(monkeypatch: pytest.MonkeyPatch, score: str) -> None:
    """Rows of many blocks, reduced a few partial sums at a time (each channel of each), give the reference sums;
    the update too."""
    from molf_ds.optim.kernels import triton_impl

    monkeypatch.setattr(triton_impl, "BLOCK", 64)
    monkeypatch.setattr(triton_impl, "REDUCE_BLOCK", 4)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    numel, segs = 5_003, [(3, 3_000), (3_003, 1), (3_100, 1_700), (4_900, 103)]
    ours, ref = _state(numel), _state(numel)
    got = _scores(ours, segs, score)
    torch.testing.assert_close(got, _reference_scores(ref, segs, score), rtol=1e-6, atol=0.0)
    _update(ours, segs, 0.1, 0.001)
    _reference_update(ref, segs, 0.1, 0.001)
    _assert_state_close(ours, ref)


def test_scores_deterministic(backend: str) -> None:
    numel, segs = LAYOUTS["gaps"]
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            s = _state(numel)
            scores = _scores(s, segs, "pfn")
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
    monkeypatch.setenv(kernels.ENV_VAR, "triton")  # on CPU tensors: under TRITON_INTERPRET=1 only
    assert kernels.backend(x, x) == "triton" and kernels.backend(x, x.double()) == "torch"
    assert kernels.cpp_unavailable() == "is turned off by MOLF_DS_KERNEL=triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
        kernels.backend(x, x)
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.backend(x, x)


def test_build_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpp_impl.REQUIRE_ENV, raising=False)
    monkeypatch.setattr(cpp_impl, "build_error", lambda: "no compiler")
    with pytest.warns(UserWarning, match="no compiler.*torch kernels"):
        assert cpp_impl.load.__wrapped__() is False
    monkeypatch.setattr(cpp_impl, "load", lambda: False)
    assert kernels.backend(torch.zeros(3)) == "torch"


def _broken_compiler_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No C++ compiler (CXX=false) and an empty extensions cache: the kernel's JIT build fails."""
    (tmp_path / "extensions").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in (cpp_impl.REQUIRE_ENV, kernels.ENV_VAR)}
    return {**env, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), **extra}


@pytest.mark.slow
def test_broken_compiler_warns_once_with_cause_and_cost(tmp_path: Path) -> None:
    code = ("import torch; from molf_ds.optim import kernels; x = torch.zeros(4); "
            "print(kernels.backend(x), kernels.backend(x), kernels.cpp_enabled())")
    done = subprocess.run([sys.executable, "-c", code], env=_broken_compiler_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["torch", "torch", "False"]
    warned = [line for line in done.stderr.splitlines() if "C++ CPU kernel" in line]
    assert len(warned) == 1, done.stderr
    assert "returned non-zero exit status" in warned[0]  # the cause: the compiler check failed
    assert "5x slower" in warned[0] and "MOLF_DS_KERNEL=torch" in warned[0]


@pytest.mark.slow
def test_broken_compiler_fails_the_test_command(tmp_path: Path) -> None:
    """launch/test.sh and tests/conftest.py set MOLF_DS_REQUIRE_CPP_KERNEL=1: the C++ tests then fail instead of
    skipping; with it "0" (a user's run) they skip."""
    assert f"{cpp_impl.REQUIRE_ENV}=1" in (REPO / "launch" / "test.sh").read_text()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_kernels.py"),
               "-k", "test_dispatch or test_adamw_step_matches_torch_adamw"]
    done = subprocess.run(command, cwd=tmp_path, env=_broken_compiler_env(tmp_path),  # unset: conftest sets it
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "failed to build and MOLF_DS_REQUIRE_CPP_KERNEL=1 requires it" in done.stdout
    assert " skipped" not in done.stdout.splitlines()[-1]
    users = _broken_compiler_env(tmp_path / "users", **{cpp_impl.REQUIRE_ENV: "0"})
    passing = subprocess.run(command, cwd=tmp_path, env=users, capture_output=True, text=True, timeout=300)
    assert passing.returncode == 0 and " skipped" in passing.stdout.splitlines()[-1], passing.stdout[-3000:]


def test_speculative_update_without_the_kernel_is_an_error(monkeypatch: pytest.MonkeyPatch, tiny) -> None:
    import molf_ds

    cfg = molf_ds.MoLFConfig(lora_ranks=(4,), speculative_update=True)
    model = molf_ds.wrap_model(tiny("qwen2"), cfg)
    monkeypatch.setattr(cpp_impl, "build_error", lambda: "Error building extension 'x': [1/2] c++ ...\nc++: error: no")
    with pytest.raises(ValueError, match=r"speculative_update=True needs the C\+\+ CPU kernel, which failed to build "
                                         r"\(Error building extension 'x': c\+\+: error: no\): set speculative_update"):
        molf_ds.build_optimizer(model, cfg)
    monkeypatch.setattr(cpp_impl, "build_error", lambda: None)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    with pytest.raises(ValueError, match="which is turned off by MOLF_DS_KERNEL=torch"):
        molf_ds.build_optimizer(model, cfg)


def test_env_var_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    numel, segs = LAYOUTS["gaps"]
    ours, ref = _state(numel), _state(numel)
    assert kernels.backend(ours["grad"]) == "torch"
    got = _scores(ours, segs, "epd")
    rows = [(o, n) for o, n in segs if n]  # the torch path's sums, one per non-empty row
    want = torch_impl.segment_sums_multi([ref["param"]], [ref["grad"]], [ref["exp_avg"]], [ref["exp_avg_sq"]],
                                         _table(numel, rows), *BETAS, "epd")
    assert torch.equal(got[[i for i, (_, n) in enumerate(segs) if n]], want)
    _assert_state_close(ours, ref)


def test_public_functions_match_backends() -> None:
    numel, segs = LAYOUTS["gaps"]
    ours, ref = _state(numel), _state(numel)
    got = _scores(ours, segs, "epd")
    torch.testing.assert_close(got, _reference_scores(ref, segs, "epd"), rtol=1e-6, atol=0.0)
    _update(ours, segs, 0.1, 0.001)
    _reference_update(ref, segs, 0.1, 0.001)
    _assert_state_close(ours, ref)


def test_non_fp32_takes_torch_path() -> None:
    numel, segs = LAYOUTS["gaps"]
    ours = {k: t.double() for k, t in _state(numel).items()}
    ref = _clone(ours)
    assert kernels.backend(ours["grad"]) == "torch"
    got = _scores(ours, segs, "pfn")
    torch.testing.assert_close(got, _reference_scores(ref, segs, "pfn"), rtol=1e-6, atol=0.0)
    _assert_state_close(ours, ref)


@pytest.mark.parametrize(
    "segs", [[(10, 5), (12, 5)], [(10, 5), (0, 2)], [(95, 10)], [(-1, 2)], [(3, -1)]],
    ids=["overlap", "unsorted", "past_end", "negative_offset", "negative_length"],
)
def test_bad_segments_rejected(segs: list[tuple[int, int]]) -> None:
    s = _state(100)
    with pytest.raises(ValueError, match="segments"):
        _scores(s, segs, "epd")


def test_bad_arguments_rejected() -> None:
    s = _state(100)
    segs = [(0, 10)]
    with pytest.raises(ValueError, match="score"):
        _scores(s, segs, "l2")
    with pytest.raises(ValueError, match="size"):
        _scores({**s, "grad": s["grad"][:50]}, segs, "epd")
    transposed = {k: t.view(10, 10).t() for k, t in s.items()}
    with pytest.raises(ValueError, match="contiguous"):
        _scores(transposed, segs, "epd")
