import pytest
import torch

import signalrl.losses as L
from signalrl.losses.ppo import CONSERVATIVE_METRICS

from ._helpers import (
    H, V, assert_close, assert_float64_match, assert_metrics, double, frozen_copy, ppo_oracle, shifted_mask, tiny_model,
)


def setup(drift=0.05, B=3, T=9):
    model = tiny_model()
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(drift * torch.randn_like(p))
    head = L.ValueHead(H)
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :2] = 0
    mask = shifted_mask(attn)
    policy = L.PolicyModel(model, reference_model=ref, value_head=head)
    with torch.no_grad():
        old = policy.token_logprobs(ids, attn) + 0.2 * torch.randn(B, T)
    rewards = torch.zeros(B, T)
    rewards[:, -1] = torch.randn(B)
    return model, ref, head, policy, dict(input_ids=ids, attention_mask=attn, old_log_probs=old, rewards=rewards), mask


@pytest.mark.parametrize("max_kl", [0.0, 0.01, 10.0])
def test_matches_float64_formula(max_kl):
    model, ref, head, policy, batch, mask = setup()
    res = L.conservative_ppo(policy, batch, max_kl_divergence=max_kl, conservative_coef=3.0)
    res.loss.backward()
    m64 = double(model)
    loss64, metrics64 = ppo_oracle(m64, double(ref), double(head), batch["input_ids"], batch["attention_mask"],
                                   batch["old_log_probs"], batch["rewards"], mask, vf_coef=0.0, ent_coef=0.0,
                                   beta=0.0, conservative=(3.0, max_kl))
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="loss")
    assert_metrics(res, metrics64, CONSERVATIVE_METRICS, rtol=1e-3, atol=1e-6)
    assert res.metrics["kl_violation"] == (1.0 if max_kl < metrics64["kl_divergence"] else 0.0)
    assert res.metrics["max_kl_threshold"] == max_kl
    # the penalty's gradient flows (through the KL) into the policy; never into the reference
    assert_close(model.lm_head.weight.grad, m64.lm_head.weight.grad, rtol=1e-3, atol=1e-7, what="d lm_head")
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is None for p in head.parameters())  # value_loss_coef defaults to 0 here


def test_penalty_is_zero_below_threshold_and_quadratic_above():
    model, ref, head, policy, batch, mask = setup()
    below = L.conservative_ppo(policy, batch, max_kl_divergence=1.0)
    assert below.metrics["kl_penalty"] == 0.0 and below.metrics["kl_violation"] == 0.0
    kl = below.metrics["kl_divergence"]
    above = L.conservative_ppo(policy, batch, max_kl_divergence=0.0, conservative_coef=2.0)
    assert abs(above.metrics["kl_penalty"] - 2.0 * kl * kl) < 1e-6 * max(1.0, kl)
    assert abs((above.metrics["loss"] - below.metrics["loss"]) - 2.0 * kl * kl) < 1e-5


def test_works_without_values_and_requires_a_reference():
    model, ref, head, policy, batch, mask = setup()
    res = L.conservative_ppo(L.PolicyModel(model, reference_model=ref), batch)  # zero baseline
    assert set(res.metrics) == set(CONSERVATIVE_METRICS)
    assert not any("explained variance" in w for w in res.warnings)
    with pytest.raises(ValueError, match="reference"):
        L.conservative_ppo(L.PolicyModel(model), batch)


def test_kwargs_and_batch_validation():
    model, ref, head, policy, batch, mask = setup()
    with pytest.raises(ValueError, match="max_kl_divergence"):
        L.conservative_ppo(policy, batch, max_kl=0.1)
    with pytest.raises(ValueError, match="conservative_coef"):
        L.conservative_ppo(policy, batch, conservative_coef=-1.0)
    with pytest.raises(TypeError, match="rewards"):
        L.conservative_ppo(policy, dict(batch, rewards=batch["rewards"].long()))


def test_non_finite_raises_before_backward():
    model, ref, head, policy, batch, mask = setup()
    with pytest.raises(ValueError, match="rewards"):  # non-finite batch values are refused before compute
        L.conservative_ppo(policy, dict(batch, rewards=batch["rewards"] * float("inf")))
    stale = torch.full_like(batch["old_log_probs"], -1e4)  # valid, but ρ = inf without the log-ratio clamp
    with pytest.raises(L.NonFiniteLossError):
        L.conservative_ppo(policy, dict(batch, old_log_probs=stale), log_ratio_clamp=None)
    assert all(p.grad is None for p in model.parameters())


def test_kl_warning_and_convergence_pulls_kl_under_threshold():
    torch.manual_seed(1)
    model, ref, head, policy, batch, mask = setup(drift=0.3)
    batch = dict(batch, rewards=torch.zeros_like(batch["rewards"]))  # no reward: only the penalty acts
    first = L.conservative_ppo(policy, batch, max_kl_divergence=0.01, conservative_coef=10.0)
    assert first.metrics["kl_violation"] == 1.0
    assert any("KL divergence" in w for w in first.warnings)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        res = L.conservative_ppo(policy, batch, max_kl_divergence=0.01, conservative_coef=10.0)
        res.loss.backward()
        opt.step()
    assert res.metrics["kl_divergence"] < 0.5 * first.metrics["kl_divergence"]
    assert res.metrics["loss"] < first.metrics["loss"]


def test_float64_model_matches_formula_to_1e_12():
    model, ref, head, policy, batch, mask = setup()
    m64, r64, h64, o64 = double(model), double(ref), double(head), double(model)
    res = L.conservative_ppo(L.PolicyModel(m64, reference_model=r64, value_head=h64), batch,
                             max_kl_divergence=0.0, conservative_coef=3.0)
    res.loss.backward()
    loss64, metrics64 = ppo_oracle(o64, r64, double(head), batch["input_ids"], batch["attention_mask"],
                                   batch["old_log_probs"], batch["rewards"], mask, vf_coef=0.0, ent_coef=0.0,
                                   beta=0.0, conservative=(3.0, 0.0))
    loss64.backward()
    assert_float64_match(res, loss64, metrics64, CONSERVATIVE_METRICS, m64.named_parameters(), o64.parameters())
