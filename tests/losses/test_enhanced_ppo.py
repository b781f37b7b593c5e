import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses import _common
from signalrl.losses.ppo import PPO_METRICS

from ._helpers import (
    H, V, assert_float64_match, assert_close, assert_metrics, double, frozen_copy, ppo_oracle, shifted_mask, tiny_model,
)


def setup(B=3, T=9, left_pad=True):
    model = tiny_model()
    ref = frozen_copy(model)
    with torch.no_grad():  # make the policy differ from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    head = L.ValueHead(H)
    policy = L.PolicyModel(model, reference_model=ref, value_head=head)
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    if left_pad:
        attn[0, :3] = 0
    mask = shifted_mask(attn)
    with torch.no_grad():
        old = policy.token_logprobs(ids, attn) + 0.3 * torch.randn(B, T)
    rewards = 0.1 * torch.randn(B, T) * mask.float()
    rewards[:, -1] += torch.randn(B)
    batch = dict(input_ids=ids, attention_mask=attn, old_log_probs=old, rewards=rewards)
    return model, ref, head, policy, batch, mask


@pytest.mark.parametrize("fused", [True, False])
def test_matches_float64_formula_values_and_grads(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref, head, policy, batch, mask = setup()
    res = L.enhanced_ppo(policy, batch)
    res.loss.backward()

    m64, r64, h64 = double(model), double(ref), double(head)
    loss64, metrics64 = ppo_oracle(m64, r64, h64, batch["input_ids"], batch["attention_mask"], batch["old_log_probs"],
                                   batch["rewards"], mask)
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-5, what="loss")
    assert_metrics(res, metrics64, PPO_METRICS, rtol=1e-3, atol=1e-5)
    # gradients reach the LM head, the backbone and the value head, and match float64
    assert_close(model.lm_head.weight.grad, m64.lm_head.weight.grad, rtol=1e-3, atol=1e-6, what="d lm_head")
    q32 = model.model.layers[0].self_attn.q_proj.weight.grad
    assert_close(q32, m64.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-3, atol=1e-6, what="d q_proj")
    assert_close(head.linear.weight.grad, h64.linear.weight.grad, rtol=1e-3, atol=1e-6, what="d value head")
    assert all(p.grad is None for p in ref.parameters()), "the reference must get no gradient"


@pytest.mark.parametrize("agg,estimator", [("token-mean", "k1"), ("seq-mean-token-mean", "k2"),
                                           ("seq-mean-token-sum", "abs"), ("seq-mean-token-sum-norm", "k3")])
def test_clip_and_without_gae_and_options(agg, estimator):
    model, ref, head, policy, batch, mask = setup(left_pad=True)
    kw = dict(clip_epsilon=0.1, clip_epsilon_high=0.3, dual_clip=1.5, use_gae=False, normalize_advantages=False,
              beta=0.05, entropy_coef=0.03, value_loss_coef=1.0, loss_aggregation=agg, kl_estimator=estimator)
    res = L.enhanced_ppo(policy, batch, **kw)
    loss64, metrics64 = ppo_oracle(double(model), double(ref), double(head), batch["input_ids"],
                                   batch["attention_mask"], batch["old_log_probs"], batch["rewards"], mask,
                                   clip=0.1, clip_high=0.3, use_gae=False, normalize=False, beta=0.05, ent_coef=0.03,
                                   vf_coef=1.0, dual_clip=1.5, estimator=estimator, agg=agg)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-5, what="loss")
    assert_metrics(res, metrics64, PPO_METRICS, rtol=1e-3, atol=1e-5)


def test_without_gae_advantages_are_discounted_returns_minus_values():
    model, ref, head, policy, batch, mask = setup(left_pad=False)
    values = torch.randn_like(batch["rewards"])
    batch = dict(batch, values=values)
    plain = L.PolicyModel(model, reference_model=ref)  # no value head: the batch's values are used
    res = L.enhanced_ppo(plain, batch, use_gae=False, normalize_advantages=False, gamma=0.9)
    # discounted returns by hand
    R = torch.zeros_like(values, dtype=torch.float64)
    for b in range(values.shape[0]):
        acc = 0.0
        for t in reversed(range(values.shape[1])):
            if mask[b, t]:
                acc = float(batch["rewards"][b, t]) + 0.9 * acc
                R[b, t] = acc
    adv = (R - values.double()) * mask
    assert math.isclose(res.metrics["advantage_mean"], float((adv.sum() / mask.sum())), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(res.metrics["return_mean"], float((R * mask).sum() / mask.sum()), rel_tol=1e-4, abs_tol=1e-6)


def test_batch_values_and_old_values_are_used():
    model, ref, head, policy, batch, mask = setup(left_pad=False)
    values = 0.5 * torch.randn_like(batch["rewards"])
    old_values = values + 0.3 * torch.randn_like(values)
    batch = dict(batch, values=values, old_values=old_values)
    res = L.enhanced_ppo(policy, batch)
    loss64, metrics64 = ppo_oracle(double(model), double(ref), double(head), batch["input_ids"],
                                   batch["attention_mask"], batch["old_log_probs"], batch["rewards"], mask,
                                   values=values, old_values=old_values)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-5, what="loss")


def test_response_mask_restricts_actions():
    model, ref, head, policy, batch, mask = setup(left_pad=False)
    resp = torch.zeros_like(batch["attention_mask"])
    resp[:, 5:] = 1
    res = L.enhanced_ppo(policy, dict(batch, response_mask=resp))
    m = mask * resp.double()
    loss64, metrics64 = ppo_oracle(double(model), double(ref), double(head), batch["input_ids"],
                                   batch["attention_mask"], batch["old_log_probs"], batch["rewards"] * m.float(), m)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-5, what="loss")
    assert any("outside the response mask" in w for w in res.warnings)


def test_needs_values_or_head_and_reference():
    model, ref, head, policy, batch, mask = setup()
    with pytest.raises(ValueError, match="value head"):
        L.enhanced_ppo(L.PolicyModel(model, reference_model=ref), batch)
    with pytest.raises(ValueError, match="reference"):
        L.enhanced_ppo(L.PolicyModel(model, value_head=head), batch)
    # beta=0 needs no reference; kl_divergence is then 0
    res = L.enhanced_ppo(L.PolicyModel(model, value_head=head), batch, beta=0.0)
    assert res.metrics["kl_divergence"] == 0.0
    # reference_model passed as a kwarg
    res2 = L.enhanced_ppo(L.PolicyModel(model, value_head=head), batch, reference_model=ref)
    assert res2.metrics["kl_divergence"] > 0


def test_kwargs_and_batch_validation():
    model, ref, head, policy, batch, mask = setup()
    with pytest.raises(ValueError, match="clip_epsilon"):
        L.enhanced_ppo(policy, batch, clip_eps=0.1)
    with pytest.raises(ValueError, match="gamma"):
        L.enhanced_ppo(policy, batch, gamma=1.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        L.enhanced_ppo(policy, batch, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"old_log_probs.*\[B=3, T=9\].*\[3, 8\]"):
        L.enhanced_ppo(policy, dict(batch, old_log_probs=batch["old_log_probs"][:, :-1]))
    with pytest.raises(ValueError, match="missing required key 'rewards'"):
        L.enhanced_ppo(policy, {k: v for k, v in batch.items() if k != "rewards"})
    with pytest.raises(ValueError, match="Did you mean 'old_log_probs'"):
        b = dict(batch)
        b["old_logprobs"] = b.pop("old_log_probs")
        L.enhanced_ppo(policy, b)


def test_non_finite_raises_before_backward():
    model, ref, head, policy, batch, mask = setup()
    bad = batch["old_log_probs"].clone()
    bad[1, 4] = float("nan")  # where it counts: the batch check names the key
    with pytest.raises(ValueError, match="old_log_probs"):
        L.enhanced_ppo(policy, dict(batch, old_log_probs=bad))
    stale = torch.full_like(bad, -1e4)  # valid but stale: ρ = inf on negative-advantage tokens without the clamp
    with pytest.raises(L.NonFiniteLossError):
        L.enhanced_ppo(policy, dict(batch, old_log_probs=stale), log_ratio_clamp=None)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in head.parameters())


def test_module_form_and_registry_agree():
    model, ref, head, policy, batch, mask = setup()
    a = L.get_loss("enhanced_ppo")(policy, batch, beta=0.02)
    b = L.EnhancedPPOLoss(value_head=head, reference_model=ref, beta=0.02)(model, batch)
    assert_close(a.loss.detach(), b.loss.detach(), rtol=1e-6, atol=1e-7, what="module vs registry")
    loss_mod = L.EnhancedPPOLoss(value_head=head, reference_model=ref)
    names = {n for n, _ in loss_mod.named_parameters()}
    assert names == {"value_head.linear.weight", "value_head.linear.bias"}  # never the reference


def test_convergence_rewarded_sequence_becomes_more_likely():
    torch.manual_seed(0)
    model = tiny_model()
    head = L.ValueHead(H)
    policy = L.PolicyModel(model, reference_model=frozen_copy(model), value_head=head)
    ids = torch.randint(0, V, (2, 8))
    attn = torch.ones_like(ids)
    rewards = torch.zeros(2, 8)
    rewards[0, -1], rewards[1, -1] = 1.0, -1.0
    mask = shifted_mask(attn).float()

    def seq_lp():
        with torch.no_grad():
            return (policy.token_logprobs(ids, attn) * mask).sum(-1)

    start = seq_lp()
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    for _ in range(6):  # rollouts
        with torch.no_grad():
            old = policy.token_logprobs(ids, attn)
        for _ in range(4):  # PPO epochs
            opt.zero_grad()
            res = L.enhanced_ppo(policy, dict(input_ids=ids, attention_mask=attn, old_log_probs=old, rewards=rewards))
            res.loss.backward()
            opt.step()
    end = seq_lp()
    assert end[0] > start[0] + 1.0 and end[1] < start[1] - 1.0, (start, end)


def test_precomputed_reference_log_probs_skip_the_reference():
    model, ref, head, policy, batch, mask = setup()
    full = L.enhanced_ppo(policy, batch, beta=0.1)
    ref_lp = L.PolicyModel(ref).token_logprobs(batch["input_ids"], batch["attention_mask"]).detach()
    no_ref = L.PolicyModel(model, value_head=head)  # would raise without the precomputed log-probs
    pre = L.enhanced_ppo(no_ref, dict(batch, ref_log_probs=ref_lp), beta=0.1)
    assert_close(pre.loss.detach(), full.loss.detach(), rtol=1e-6, atol=1e-7, what="precomputed reference")
    assert pre.metrics["kl_divergence"] == pytest.approx(full.metrics["kl_divergence"], rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_float64_model_matches_formula_to_1e_12(fused, monkeypatch):
    """A float64 model and value head compute in float64 throughout: no float32 casts of batch or heads."""
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref, head, policy, batch, mask = setup()
    m64, r64, h64 = double(model), double(ref), double(head)
    o64, oh64 = double(model), double(head)  # the oracle's own copies (its own gradients)
    kw = dict(beta=0.05, entropy_coef=0.03, dual_clip=2.0)
    res = L.enhanced_ppo(L.PolicyModel(m64, reference_model=r64, value_head=h64), batch, **kw)
    res.loss.backward()
    loss64, metrics64 = ppo_oracle(o64, r64, oh64, batch["input_ids"], batch["attention_mask"],
                                   batch["old_log_probs"], batch["rewards"], mask, beta=0.05, ent_coef=0.03,
                                   dual_clip=2.0)
    loss64.backward()
    assert_float64_match(res, loss64, metrics64, PPO_METRICS,
                         list(m64.named_parameters()) + list(h64.named_parameters()),
                         list(o64.parameters()) + list(oh64.parameters()))
