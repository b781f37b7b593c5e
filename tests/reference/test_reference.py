"""The reference is the ground truth: check it against independent, scalar formulas."""
import math

import pytest
import torch

from signalrl import reference as R
from signalrl.ops import token_weights


def _scalar_gae(r, v, m, gamma, lam, last):
    """Drop masked positions, run textbook GAE with Python floats, scatter back."""
    idx = [t for t in range(len(r)) if m[t]]
    adv = [0.0] * len(r)
    ret = [0.0] * len(r)
    a_next, v_next = 0.0, last
    for t in reversed(idx):
        delta = r[t] + gamma * v_next - v[t]
        a_next = delta + gamma * lam * a_next
        adv[t], ret[t] = a_next, a_next + v[t]
        v_next = v[t]
    return adv, ret


@pytest.mark.parametrize("layout", ["random", "left-pad", "right-pad", "span", "all-masked", "T1"])
def test_gae_matches_compacted_scalar_loop(layout):
    B, T = 4, 1 if layout == "T1" else 13
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    last = torch.randn(B, dtype=torch.float64)
    m = torch.ones(B, T, dtype=torch.bool)
    if layout == "random":
        m = torch.rand(B, T) > 0.3
    elif layout == "left-pad":
        for b in range(B):
            m[b, : b * 2] = False
    elif layout == "right-pad":
        for b in range(B):
            m[b, T - b * 2:] = False
    elif layout == "span":
        m[:, 4:8] = False
    elif layout == "all-masked":
        m[:] = False
    adv, ret = R.gae(r, v, m, gamma=0.97, lam=0.9, last_values=last)
    for b in range(B):
        ea, er = _scalar_gae(r[b].tolist(), v[b].tolist(), m[b].tolist(), 0.97, 0.9, last[b].item())
        assert torch.allclose(adv[b], torch.tensor(ea, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(ret[b], torch.tensor(er, dtype=torch.float64), atol=1e-12)


def test_clipped_surrogate_hand_values():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]], dtype=torch.float64))
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]], dtype=torch.float64)
    loss, stats = R.clipped_surrogate(logp, old, adv, clip_low=0.2, dual_clip=2.5)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    # token 2: max(-2.2, -2.2) = -2.2; token 3: max(3.0, 1.2) = 3.0, dual clip → min(3.0, 2.5) = 2.5
    expected = torch.tensor([-1.2, 0.8, -2.2, 2.5], dtype=torch.float64)
    assert torch.allclose(loss, expected.mean())
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["dual_clip_fraction"].item() == pytest.approx(0.25)
    assert stats["ratio_max"].item() == pytest.approx(3.0)
    assert stats["ratio_min"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", R.AGGREGATIONS)
def test_aggregations_and_token_weights(mode):
    x = torch.randn(5, 7, dtype=torch.float64)
    m = (torch.rand(5, 7) > 0.4).double()
    m[2] = 0  # a row with nothing counted
    rows = [(x[b][m[b] > 0]) for b in range(5)]
    valid_rows = [r for r in rows if len(r)]
    expected = {
        "token-mean": sum(r.sum() for r in rows) / m.sum(),
        "seq-mean-token-sum": sum(r.sum() for r in valid_rows) / len(valid_rows),
        "seq-mean-token-mean": sum(r.mean() for r in valid_rows) / len(valid_rows),
        "seq-mean-token-sum-norm": sum(r.sum() for r in rows) / x.numel(),
    }[mode]
    # the result can be ~0 (a sum of signed terms): tolerances scale with the terms' size, not the result's
    size = (m * x.abs()).sum().item()
    assert R.aggregate(x, m, mode).item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14 * size)
    w = token_weights(m, mode).double()  # float32 weights: each rounded to ~6e-8 of itself
    assert (w * x).sum().item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6 * (w.abs() * x.abs()).sum().item())
    assert R.aggregate(x, torch.zeros_like(m), mode).item() == 0.0


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = lp - ref
    assert torch.allclose(R.kl_penalty(lp, ref, "k1"), d)
    assert torch.allclose(R.kl_penalty(lp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(R.kl_penalty(lp, ref, "k3"), torch.exp(-d) + d - 1)
    assert torch.allclose(R.kl_penalty(lp, ref, "abs"), d.abs())
    with pytest.raises(ValueError, match="estimator"):
        R.kl_penalty(lp, ref, "k4")


def test_value_loss_clipping_and_explained_variance():
    v = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    old = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    ret = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)
    loss, stats = R.value_loss(v, old, ret, clip=0.5)
    # token 0: v_c = 0.5 → max(0, 0.25); token 1: max(1, 1); token 2: max(9, 9)
    assert loss.item() == pytest.approx((0.5 * 0.25 + 0.5 * 1 + 0.5 * 9) / 3)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)
    ev = 1 - torch.var(ret - v) / torch.var(ret)
    assert stats["explained_variance"].item() == pytest.approx(ev.item())


def test_group_normalize_and_whiten():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    a = R.group_normalize(r, eps=0.0)
    assert torch.allclose(a[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(R.group_normalize(r)).all() and (R.group_normalize(r)[1] == 0).all()
    assert torch.allclose(R.group_normalize(r, scale=False)[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    x = torch.randn(4, 6, dtype=torch.float64)
    m = torch.rand(4, 6) > 0.3
    w = R.masked_whiten(x, m)
    assert R.masked_mean(w, m).abs().item() < 1e-12
    assert R.masked_var(w, m).item() == pytest.approx(1.0, rel=1e-6)
    assert (w[~m] == 0).all()


def test_token_logprobs_matches_textbook():
    logits = torch.randn(3, 11, dtype=torch.float64)
    t = torch.tensor([2, 0, 10])
    lp, ent = R.token_logprobs(logits, t, temperature=2.0, return_entropy=True)
    for i in range(3):
        z = [x / 2.0 for x in logits[i].tolist()]
        lse = math.log(sum(math.exp(v) for v in z))
        assert lp[i].item() == pytest.approx(z[t[i]] - lse, abs=1e-12)
        assert ent[i].item() == pytest.approx(-sum(math.exp(v - lse) * (v - lse) for v in z), abs=1e-12)
