import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses.importance_sampling import METRICS

from ._helpers import (
    V, assert_close, assert_float64_match, assert_metrics, double, f64_token_logprobs, frozen_copy, shifted_mask, tiny_model,
)

B, T = 4, 8


def setup():
    model = tiny_model()
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[2, :2] = 0
    mask = shifted_mask(attn)
    with torch.no_grad():
        seq = (L.PolicyModel(model).token_logprobs(ids, attn) * mask.float()).sum(-1)
    # behaviour log-probs around the current ones; row 0 far below so its weight is clipped
    behavior = seq + torch.tensor([-5.0, 0.3, -0.2, 0.1])
    return model, ref, dict(input_ids=ids, attention_mask=attn, behavior_log_probs=behavior, rewards=torch.randn(B)), mask


def oracle(m64, r64, batch, mask, beta=0.1, clip_ratio=10.0, advantages=None):
    lp, _ = f64_token_logprobs(m64, batch["input_ids"], batch["attention_mask"])
    log_w = (lp * mask).sum(-1) - batch["behavior_log_probs"].double()
    w = torch.exp(log_w)
    clipped = w > clip_ratio
    w_bar = torch.where(clipped, torch.full_like(w, clip_ratio), w)  # constant where clipped: no gradient
    r = batch["rewards"].double()
    if r.dim() == 2:
        r = (r * mask).sum(-1)
    A = r - r.mean() if advantages is None else advantages.double()
    pg = -(w_bar * A).mean()
    kl = torch.zeros((), dtype=torch.float64)
    if beta:
        with torch.no_grad():
            ref_lp, _ = f64_token_logprobs(r64, batch["input_ids"], batch["attention_mask"])
        d = lp - ref_lp
        kl = ((torch.exp(-d) + d - 1) * mask).sum() / mask.sum()
    loss = pg + beta * kl
    metrics = dict(is_ratio_mean=w.mean(), is_ratio_max=w.max(), is_ratio_min=w.min(),
                   clipped_fraction=clipped.double().mean(), kl_divergence=kl, policy_loss=pg)
    return loss, {k: float(v.detach()) for k, v in metrics.items()}


def test_matches_float64_formula_and_clipped_rows_get_no_gradient():
    model, ref, batch, mask = setup()
    res = L.importance_sampling(model, batch, reference_model=ref)
    res.loss.backward()
    m64 = double(model)
    loss64, metrics64 = oracle(m64, double(ref), batch, mask)
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="loss")
    assert_metrics(res, metrics64, METRICS, rtol=1e-3, atol=1e-6)
    assert res.metrics["clipped_fraction"] == 0.25  # row 0
    assert_close(model.lm_head.weight.grad, m64.lm_head.weight.grad, rtol=1e-3, atol=1e-7, what="d lm_head")
    assert all(p.grad is None for p in ref.parameters())


def test_clipped_weight_is_a_constant():
    model, ref, batch, mask = setup()
    only_clipped = dict(batch, advantages=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    res = L.importance_sampling(model, only_clipped, beta=0.0)
    res.loss.backward()
    assert res.metrics["policy_loss"] == pytest.approx(-10.0 / 4)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_per_token_rewards_and_given_advantages():
    model, ref, batch, mask = setup()
    tok = torch.randn(B, T)
    res = L.importance_sampling(model, dict(batch, rewards=tok), reference_model=ref, clip_ratio=2.0)
    loss64, metrics64 = oracle(double(model), double(ref), dict(batch, rewards=tok), mask, clip_ratio=2.0)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="per-token rewards")
    adv = torch.randn(B)
    res = L.importance_sampling(model, dict(batch, advantages=adv), beta=0.0)
    loss64, _ = oracle(double(model), None, batch, mask, beta=0.0, advantages=adv)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="given advantages")
    assert "kl_divergence" in res.metrics


def test_validation():
    model, ref, batch, mask = setup()
    with pytest.raises(ValueError, match="Did you mean 'clip_ratio'"):
        L.importance_sampling(model, batch, reference_model=ref, clip_ration=5.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        L.importance_sampling(model, batch, reference_model=ref, clip_ratio=0.5)
    with pytest.raises(ValueError, match=r"rewards.*\[B=4\] or expected shape \[B=4, T=8\]"):
        L.importance_sampling(model, dict(batch, rewards=torch.randn(4, 3)), reference_model=ref)
    with pytest.raises(ValueError, match=r"behavior_log_probs.*\[B=4\].*\[4, 8\]"):
        L.importance_sampling(model, dict(batch, behavior_log_probs=torch.randn(B, T)), reference_model=ref)


def test_non_finite_and_overflowing_weights():
    model, ref, batch, mask = setup()
    # a huge weight is clipped (finite loss) but reported: is_ratio_max is inf -> a warning
    huge = dict(batch, behavior_log_probs=batch["behavior_log_probs"] - torch.tensor([1e4, 0, 0, 0]))
    res = L.importance_sampling(model, huge, beta=0.0)
    assert math.isinf(res.metrics["is_ratio_max"]) and any("non-finite" in w for w in res.warnings)
    res.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="rewards"):  # non-finite batch values are refused before compute
        L.importance_sampling(model, dict(batch, rewards=torch.tensor([float("nan"), 0, 0, 0])), beta=0.0)
    with pytest.raises(L.NonFiniteLossError):  # finite rewards whose mean overflows
        L.importance_sampling(model, dict(batch, rewards=torch.full((B,), 3e38)), beta=0.0)
    assert all(p.grad is None for p in model.parameters())


def test_convergence_positive_advantage_sequence_becomes_more_likely():
    torch.manual_seed(0)
    model = tiny_model()
    ref = frozen_copy(model)
    ids = torch.randint(0, V, (2, 8))
    attn = torch.ones_like(ids)
    mask = shifted_mask(attn).float()
    policy = L.PolicyModel(model, reference_model=ref)
    with torch.no_grad():
        behavior = (policy.token_logprobs(ids, attn) * mask).sum(-1)
    batch = dict(input_ids=ids, attention_mask=attn, behavior_log_probs=behavior, rewards=torch.tensor([1.0, -1.0]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        opt.zero_grad()
        res = L.ImportanceSamplingLoss(clip_ratio=5.0)(policy, batch)
        first = first or res.metrics
        res.loss.backward()
        opt.step()
    assert res.metrics["loss"] < first["loss"] - 1.0
    with torch.no_grad():
        seq = (policy.token_logprobs(ids, attn) * mask).sum(-1)
    assert seq[0] > behavior[0] + 0.5 and seq[1] < behavior[1] - 0.5


def test_precomputed_reference_log_probs():
    model, ref, batch, mask = setup()
    full = L.importance_sampling(model, batch, reference_model=ref)
    ref_lp = L.PolicyModel(ref).token_logprobs(batch["input_ids"], batch["attention_mask"]).detach()
    pre = L.importance_sampling(model, dict(batch, ref_log_probs=ref_lp))
    assert_close(pre.loss.detach(), full.loss.detach(), rtol=1e-6, atol=1e-7, what="precomputed reference")


def test_float64_model_matches_formula_to_1e_12():
    model, ref, batch, mask = setup()
    batch = dict(batch, rewards=torch.randn(B, T))  # per-token rewards, summed over the response
    m64, r64, o64 = double(model), double(ref), double(model)
    res = L.importance_sampling(m64, batch, reference_model=r64, clip_ratio=2.0)
    res.loss.backward()
    loss64, metrics64 = oracle(o64, r64, batch, mask, clip_ratio=2.0)
    loss64.backward()
    assert_float64_match(res, loss64, metrics64, METRICS, m64.named_parameters(), o64.parameters())


def test_log_ratio_clamp_bounds_the_sequence_ratio():
    model, ref, batch, mask = setup()
    assert L.get_loss("importance_sampling").defaults["log_ratio_clamp"] is None  # see the module docstring
    huge = dict(batch, behavior_log_probs=batch["behavior_log_probs"] - torch.tensor([1e4, 0, 0, 0]))
    res = L.importance_sampling(model, huge, beta=0.0, log_ratio_clamp=20.0, clip_ratio=1e10)
    assert res.metrics["is_ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert res.metrics["clipped_fraction"] == 0.25  # of the unclamped log-ratio
    loss64, _ = oracle(double(model), None, huge, mask, beta=0.0, clip_ratio=math.exp(20.0))
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-5, atol=1e-6, what="clamped weight")
