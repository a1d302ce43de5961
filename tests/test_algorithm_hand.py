"""One MoLFLinear, two optimizer steps, everything checked against values computed
here by hand from the formulas of docs/design.md ("The algorithm") (float64, explicit gradients of
L = 0.5 * sum(y^2)); independent of tests/helpers/reference_molf.py.

y = W x + b + s * B A x,  dL/dy = y:
  dW = Y^T X,  db = sum_rows Y,  dB = s * Y^T (X A^T),  dA = s * (Y B)^T X
"""
from __future__ import annotations

import math

import pytest
import torch

import molf_ds


B1, B2, EPS, EPS_S = 0.9, 0.999, 1e-4, 1e-8  # optimizer eps != score eps on purpose
WD, LWD = 0.1, 0.01
R, ALPHA = 2, 2.0
S = ALPHA / math.sqrt(R)  # rsLoRA

W0 = [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]]
BIAS0 = [0.05, -0.1]
A0 = [[0.3, -0.2, 0.1], [-0.4, 0.25, 0.35]]
LB0 = [[0.2, -0.1], [0.15, 0.3]]  # nonzero lora_B: both experts get gradients from step 1
X_GENERAL = [[1.0, -2.0, 0.5], [0.3, 0.8, -1.2]]
X_COL2_ZERO = [[1.0, -2.0, 0.0], [0.3, 0.8, 0.0]]  # zero-grad elements still count in N_e
X_LDW = [[2.0, -0.5, 0.0], [-1.5, 0.8, -0.1]]  # LDW routes to both experts (to `full` at X_GENERAL)


def hand_steps(x, lr, lora_lr, score, factors):
    """Explicit per-step computation; returns a list of dicts (grads, moments, scores, winner, params)."""
    d = torch.float64
    P = {"W": torch.tensor(W0, dtype=d), "b": torch.tensor(BIAS0, dtype=d),
         "A": torch.tensor(A0, dtype=d), "B": torch.tensor(LB0, dtype=d)}
    X = torch.tensor(x, dtype=d)
    m = {k: torch.zeros_like(v) for k, v in P.items()}
    v = {k: torch.zeros_like(t) for k, t in P.items()}
    out = []
    for t, f in enumerate(factors, start=1):
        Y = X @ P["W"].T + P["b"] + S * (X @ P["A"].T) @ P["B"].T
        g = {"W": Y.T @ X, "b": Y.sum(0), "B": S * Y.T @ (X @ P["A"].T), "A": S * (Y @ P["B"]).T @ X}
        for k in P:
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            v[k] = B2 * v[k] + (1 - B2) * g[k] * g[k]
        lrs = {"full": lr * f, "lora0": lora_lr * f}
        members = {"full": ("W", "b"), "lora0": ("A", "B")}
        scores = {}
        for e, ks in members.items():
            n = sum(P[k].numel() for k in ks)
            if score == "epd":
                tot = sum(float((m[k] ** 2 / (v[k].sqrt() + EPS_S)).sum()) for k in ks)
                scores[e] = lrs[e] / n * tot
            elif score == "ldw":  # sum(m*u) / ||U_W||, or / S (||U_B|| ||A|| + ||B|| ||U_A||); p before the step
                u = {k: m[k] / (v[k].sqrt() + EPS_S) for k in ks}
                norm = {k: math.sqrt(float((u[k] ** 2).sum())) for k in ks}
                change = (math.sqrt(norm["W"] ** 2 + norm["b"] ** 2) if e == "full" else
                          S * (norm["B"] * float(P["A"].norm()) + float(P["B"].norm()) * norm["A"]))
                scores[e] = sum(float((m[k] * u[k]).sum()) for k in ks) / change
            else:
                tot = sum(float(((m[k] / (v[k].sqrt() + EPS_S)) ** 2).sum()) for k in ks)
                scores[e] = math.sqrt(tot) / math.sqrt(n)
        winner = "full" if scores["full"] >= scores["lora0"] else "lora0"  # tie -> lower index
        decay = {"W": WD, "b": 0.0, "A": LWD, "B": LWD}
        for k in members[winner]:
            le = lrs[winner]
            P[k] = P[k] * (1 - le * decay[k])
            P[k] = P[k] - le / (1 - B1**t) * m[k] / (v[k].sqrt() / math.sqrt(1 - B2**t) + EPS)
        out.append({"g": {k: t_.clone() for k, t_ in g.items()}, "m": {k: t_.clone() for k, t_ in m.items()},
                    "v": {k: t_.clone() for k, t_ in v.items()}, "scores": scores, "winner": winner,
                    "P": {k: t_.clone() for k, t_ in P.items()}})
    return out


@pytest.fixture(params=["default", "triton", "torch"], autouse=True)
def kernel_backend(request, monkeypatch):
    """Every hand check runs on the default kernel backend (the fused C++ one for fp32 CPU tensors), on the Triton
    one (`MOLF_DS_KERNEL=triton`, interpreted here; what runs on GPUs) and on the torch one (the fallback)."""
    if request.param != "default":
        monkeypatch.setenv("MOLF_DS_KERNEL", request.param)
    else:
        monkeypatch.delenv("MOLF_DS_KERNEL", raising=False)
    return request.param


class One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(3, 2, bias=True)

    def forward(self, x):
        return self.q_proj(x)


def package_steps(x, lr, lora_lr, score, factors):
    cfg = molf_ds.MoLFConfig(variant="molf", lora_ranks=(R,), lora_alphas=(ALPHA,), use_rslora=True,
                             lora_dropout=0.0, target_modules=("q_proj",), top_k=1, score=score,
                             lr=lr, lora_lr=lora_lr, weight_decay=WD, lora_weight_decay=LWD,
                             betas=(B1, B2), eps=EPS)
    model = molf_ds.wrap_model(One(), cfg)
    mod = model.q_proj
    assert isinstance(mod, molf_ds.MoLFLinear)
    assert list(mod.expert_names) == ["full", "lora0"]
    assert mod.scaling[0] == pytest.approx(S, rel=1e-12)
    with torch.no_grad():
        mod.base_layer.weight.copy_(torch.tensor(W0))
        mod.base_layer.bias.copy_(torch.tensor(BIAS0))
        mod.lora_A[0].weight.copy_(torch.tensor(A0))
        mod.lora_B[0].weight.copy_(torch.tensor(LB0))
    params = {"W": mod.base_layer.weight, "b": mod.base_layer.bias,
              "A": mod.lora_A[0].weight, "B": mod.lora_B[0].weight}
    opt = molf_ds.build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factors[min(s, len(factors) - 1)])
    X = torch.tensor(x)
    out = []
    for f in factors:
        for grp in opt.param_groups:
            assert grp["lr"] == pytest.approx(grp["initial_lr"] * f, abs=1e-15)
            if grp.get("kind") == "lora":
                assert grp["initial_lr"] == lora_lr
            elif grp.get("kind") in ("full", "full_bias"):
                assert grp["initial_lr"] == lr
        opt.zero_grad()
        y = model(X)
        (0.5 * (y**2).sum()).backward()
        g = {k: p.grad.detach().clone() for k, p in params.items()}
        opt.step()
        record = opt.last_routing
        sched.step()
        st = {k: opt.state[p] for k, p in params.items()}
        out.append({"g": g,
                    "m": {k: s["exp_avg"].detach().clone() for k, s in st.items()},
                    "v": {k: s["exp_avg_sq"].detach().clone() for k, s in st.items()},
                    "record": record,
                    "P": {k: p.detach().clone() for k, p in params.items()}})
    return out


def check(hand, pkg, factors):
    for t, (h, p) in enumerate(zip(hand, pkg), start=1):
        for k in "WbAB":
            torch.testing.assert_close(p["g"][k].double(), h["g"][k], rtol=1e-5, atol=1e-7,
                                       msg=lambda s: f"step {t} grad {k}: {s}")
            torch.testing.assert_close(p["m"][k].double(), h["m"][k], rtol=1e-5, atol=1e-8,
                                       msg=lambda s: f"step {t} exp_avg {k}: {s}")
            torch.testing.assert_close(p["v"][k].double(), h["v"][k], rtol=1e-5, atol=1e-10,
                                       msg=lambda s: f"step {t} exp_avg_sq {k}: {s}")
            torch.testing.assert_close(p["P"][k].double(), h["P"][k], rtol=1e-5, atol=1e-7,
                                       msg=lambda s: f"step {t} weight {k}: {s}")
        rec = p["record"]
        assert rec["step"] == t
        assert rec["lr_scale"] == pytest.approx(factors[t - 1], abs=1e-12)
        assert set(rec["modules"]) == {"q_proj"}
        entry = rec["modules"]["q_proj"]
        assert entry["winners"] == [h["winner"]], f"step {t}: {entry} vs hand {h['scores']}"
        assert set(entry["scores"]) == {"full", "lora0"}
        for e, sv in h["scores"].items():
            assert entry["scores"][e] == pytest.approx(sv, rel=1e-5, abs=1e-20), (t, e, entry["scores"], h["scores"])


@pytest.mark.parametrize(
    "x, lr, lora_lr, score, expected_winners",
    [
        (X_GENERAL, 0.1, 0.2, "epd", ["lora0", "full"]),
        (X_COL2_ZERO, 0.1, 0.1, "pfn", ["lora0", "full"]),
        (X_LDW, 0.1, 0.4, "ldw", ["lora0", "full"]),
    ],
    ids=["epd", "pfn", "ldw"],
)
def test_two_steps_by_hand(x, lr, lora_lr, score, expected_winners):
    factors = [1.0, 1.0]
    hand = hand_steps(x, lr, lora_lr, score, factors)
    # the hand computation itself routes to both experts (so losers' weights are checked too)
    assert [h["winner"] for h in hand] == expected_winners
    # hand computation: losers do not move
    assert torch.equal(hand[0]["P"]["W"], torch.tensor(W0, dtype=torch.float64))
    assert torch.equal(hand[1]["P"]["A"], hand[0]["P"]["A"])
    check(hand, package_steps(x, lr, lora_lr, score, factors), factors)


def test_warmup_tie_full_wins():
    """LR warm-up from 0: every EPD score is exactly 0, the tie goes to `full`; lr 0 so nothing moves,
    but the moments advance, and step 2 uses t=2 bias correction."""
    factors = [0.0, 1.0]
    hand = hand_steps(X_GENERAL, 0.1, 0.1, "epd", factors)
    assert hand[0]["scores"] == {"full": 0.0, "lora0": 0.0}
    assert hand[0]["winner"] == "full"
    pkg = package_steps(X_GENERAL, 0.1, 0.1, "epd", factors)
    entry = pkg[0]["record"]["modules"]["q_proj"]
    assert entry["winners"] == ["full"]
    assert entry["scores"] == {"full": 0.0, "lora0": 0.0}
    for k, v0 in {"W": W0, "b": BIAS0, "A": A0, "B": LB0}.items():
        assert torch.equal(pkg[0]["P"][k], torch.tensor(v0)), k
        assert pkg[0]["m"][k].abs().sum() > 0, k  # moments advanced for winners and losers
    check(hand, pkg, factors)


def test_scaling_without_rslora():
    cfg = molf_ds.MoLFConfig(variant="molf", lora_ranks=(4,), lora_alphas=(8.0,), use_rslora=False,
                             lora_dropout=0.0, target_modules=("q_proj",))
    model = molf_ds.wrap_model(One(), cfg)
    assert model.q_proj.scaling[0] == pytest.approx(8.0 / 4)
