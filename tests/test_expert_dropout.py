"""The experts' input dropout inside MoLFLinear: on CPU a counter-based C++ mask (kept elements rescaled through
the LoRA scale), elsewhere or with MOLF_DS_KERNEL=torch torch's nn.Dropout. Rate, determinism under
torch.manual_seed, the same mask in backward, the layer's output, and activation checkpointing."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from molf_ds.layers import MoLFLinear
from molf_ds.optim import kernels
from molf_ds.optim.kernels import cpp_impl

P = 0.1


@pytest.fixture
def cpp():
    if not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build (see the warning): torch dropout only")


def _layer(dropout: float = P, in_features: int = 48, out_features: int = 40) -> MoLFLinear:
    torch.manual_seed(0)
    layer = MoLFLinear(torch.nn.Linear(in_features, out_features), ranks=(4, 8), alphas=(8.0, 16.0), dropout=dropout)
    with torch.no_grad():
        for b in layer.lora_B:
            b.weight.normal_()  # nonzero B so that the experts' path shows in the output
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rate_and_determinism(cpp, dtype):
    x = torch.randn(1000, 1000).to(dtype) + 10.0  # no element is zero by chance
    torch.manual_seed(3)
    h = kernels.dropout_zero(x, P)
    dropped = (h == 0).double().mean().item()
    assert abs(dropped - P) < 5 * math.sqrt(P * (1 - P) / x.numel()), dropped
    kept = h != 0
    assert torch.equal(h[kept], x[kept])  # kept elements are not rescaled here
    torch.manual_seed(3)
    assert torch.equal(kernels.dropout_zero(x, P), h)  # torch's seed decides the mask
    other = kernels.dropout_zero(x, P) != 0  # the next call draws a new mask, independent of the first
    assert abs((other == kept).double().mean().item() - ((1 - P) ** 2 + P**2)) < 0.005


def test_backward_uses_the_forward_mask(cpp):
    x = (torch.randn(64, 300) + 10.0).requires_grad_()
    weights = torch.randn(64, 300)
    h = kernels.dropout_zero(x, P)
    (h * weights).sum().backward()
    assert torch.equal(x.grad, torch.where(h != 0, weights, torch.zeros(())))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_layer_output_in_training(backend, monkeypatch):
    if backend == "cpp" and not cpp_impl.load():
        pytest.skip("the C++ CPU kernel failed to build: torch dropout only")
    if backend == "torch":
        monkeypatch.setenv(kernels.ENV_VAR, "torch")
    layer = _layer().train()
    x = torch.randn(3, 5, 48)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same draw, by hand
    if backend == "cpp":
        h = kernels.dropout_zero(x, P) / (1 - P)
    else:
        h = torch.nn.functional.dropout(x, P, training=True)
    expected = layer.base_layer(x)
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scaling):
        expected = expected + s * b(a(h))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, layer.eval()(x), atol=1e-3)  # dropout did act; eval applies none


def test_mean_of_the_experts_path_is_unbiased(cpp):
    """E[dropout output] = x: averaged over many masks the layer's training output approaches its eval output."""
    layer = _layer(dropout=0.3)
    x = torch.randn(4, 48)
    eval_out = layer.eval()(x)
    layer.train()
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    lora = eval_out - layer.base_layer(x)
    assert ((mean - eval_out).norm() / lora.norm()).item() < 0.05


def test_activation_checkpointing_recomputes_the_same_mask(cpp):
    layer = _layer().train()
    x = torch.randn(6, 48)
    torch.manual_seed(11)
    layer(x).square().sum().backward()
    plain = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.manual_seed(11)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for expected, p in zip(plain, layer.parameters()):
        assert torch.equal(p.grad, expected)


@pytest.mark.parametrize("ranks", [(8,), (4, 8), (2, 4, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_one_node_equals_the_composition_without_dropout(ranks, with_bias):
    """Without dropout the experts' autograd node (stacked A, side-by-side scaled B) gives the output and the
    gradients of base(x) + sum_i s_i B_i(A_i(x)) built from torch ops, within fp32 rounding."""
    torch.manual_seed(0)
    layer = MoLFLinear(torch.nn.Linear(48, 40, bias=with_bias), ranks=ranks, alphas=[8.0] * len(ranks), dropout=0.0)
    with torch.no_grad():
        for b in layer.lora_B:
            b.weight.normal_()
    x = torch.randn(3, 5, 48, requires_grad=True)
    grad_out = torch.randn(3, 5, 40)
    layer(x).backward(grad_out)
    ours = [x.grad] + [p.grad for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    y = layer.base_layer(x)
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scaling):
        y = y + s * b(a(x))
    y.backward(grad_out)
    for got, expected in zip(ours, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_modules_sharing_an_input_draw_independent_masks(cpp, monkeypatch):
    """q, k and v read the same input; each module keeps its own mask (the paper's per-module dropout): keep rate
    1 - p in each, and two modules agree on an element as independent masks do, (1-p)^2 + p^2 of the time."""
    masks = []
    real = kernels.dropout_zero

    def recording(x, p):
        out = real(x, p)
        masks.append(out != 0)
        return out

    monkeypatch.setattr(kernels, "dropout_zero", recording)
    torch.manual_seed(0)
    modules = [MoLFLinear(torch.nn.Linear(256, 64), ranks=(4,), alphas=(8.0,), dropout=P).train() for _ in range(3)]
    x = torch.randn(64, 256) + 10.0  # no exact zeros: a zero in the output is a dropped element
    for m in modules:
        m(x).sum().backward()
    assert len(masks) == 3
    n = masks[0].numel()
    for i, mask in enumerate(masks):
        assert abs(mask.float().mean().item() - (1 - P)) < 4 * math.sqrt(P * (1 - P) / n)
        for other in masks[i + 1:]:
            agree = (mask == other).float().mean().item()
            expected = (1 - P) ** 2 + P**2
            assert abs(agree - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
