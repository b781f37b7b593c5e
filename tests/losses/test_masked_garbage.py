"""Masks select: whatever a slot that does not count holds — NaN, ±inf, 1e30 in old/ref log-probs, rewards,
values; another token id or label or mask value at a position outside the sequence — the loss, the metrics and
the gradients of every loss equal those of the same batch with zeros there."""
import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses import _common

from ._helpers import H, V, frozen_copy, tiny_model

GARBAGE = [float("nan"), float("inf"), float("-inf"), 1e30]
TOL = 1e-7


def _models(seed=0, value_head=False, reward_head=False):
    torch.manual_seed(seed)
    model = tiny_model()
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vh = L.ValueHead(H) if value_head else None
    rh = L.RewardHead(H) if reward_head else None
    return model, ref, vh, rh


def _fill(x, keep, value):
    """x where keep, else value (ids: a random valid id)."""
    if not x.is_floating_point():
        other = torch.randint_like(x, 0, V) if value is None else torch.full_like(x, value)
        return torch.where(keep, x, other)
    return torch.where(keep, x, torch.full_like(x, value))


def _run(spec, policy, batch, **kw):
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    res = spec(policy, batch, **kw)
    res.loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return res.loss.detach(), res.metrics, grads


def _assert_same(a, b):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert torch.isfinite(la) and abs(float(la) - float(lb)) <= TOL * max(1.0, abs(float(lb))), (la, lb)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert math.isfinite(ma[k]), f"{k} = {ma[k]}"
        assert abs(ma[k] - mb[k]) <= TOL * max(1.0, abs(mb[k])), f"{k}: {ma[k]} vs {mb[k]}"
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.isfinite(x).all()
            assert (x - y).abs().max() <= TOL * max(1.0, float(y.abs().max())), float((x - y).abs().max())


# --- PPO (enhanced, conservative) and importance sampling: [B, T] batches ----------------------------


def _token_batch(policy, B=3, T=10, prompt=3):
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0  # left padding
    attn[2, -2:] = 0  # right padding
    real = attn.bool()
    index_among_real = attn.cumsum(-1) - 1
    predicted = torch.zeros_like(real)
    predicted[:, 1:] = real[:, 1:] & real[:, :-1]
    resp = predicted & (index_among_real >= prompt)
    resp[1, 6] = False  # a masked span inside a response (e.g. tool output)
    with torch.no_grad():
        lp = policy.token_logprobs(ids, attn)
    return dict(
        input_ids=ids, attention_mask=attn, response_mask=resp.long(),
        old_log_probs=(lp + 0.2 * torch.randn(B, T)).clamp(max=0.0),
        ref_log_probs=(lp + 0.1 * torch.randn(B, T)).clamp(max=0.0),
        rewards=0.3 * torch.randn(B, T), values=torch.randn(B, T), old_values=torch.randn(B, T),
    ), resp, real


def _token_variants(batch, resp, real, value, keys):
    """(zeros in every slot that does not count, `value` there; other ids at padding)."""
    clean, dirty = dict(batch), dict(batch)
    for k in keys:
        clean[k] = _fill(batch[k], resp, 0.0)
        dirty[k] = _fill(batch[k], resp, value)
    clean["input_ids"] = _fill(batch["input_ids"], real, 0)
    dirty["input_ids"] = _fill(batch["input_ids"], real, None)
    return clean, dirty


PPO_KEYS = ("old_log_probs", "ref_log_probs", "rewards", "values", "old_values")


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("fused", [True, False])
def test_enhanced_ppo(value, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref, vh, _ = _models(value_head=True)
    policy = L.PolicyModel(model, value_head=vh)
    batch, resp, real = _token_batch(policy)
    clean, dirty = _token_variants(batch, resp, real, value, PPO_KEYS)
    kw = dict(beta=0.05, entropy_coef=0.02, dual_clip=3.0)
    _assert_same(_run(L.enhanced_ppo, policy, dirty, **kw), _run(L.enhanced_ppo, policy, clean, **kw))
    # every aggregation, and the batch's values instead of a value head
    plain = L.PolicyModel(model)
    for agg in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        kw = dict(beta=0.05, loss_aggregation=agg, kl_estimator="k2")
        _assert_same(_run(L.enhanced_ppo, plain, dirty, **kw), _run(L.enhanced_ppo, plain, clean, **kw))


@pytest.mark.parametrize("value", GARBAGE)
def test_conservative_ppo(value):
    model, ref, vh, _ = _models(value_head=True)
    policy = L.PolicyModel(model, value_head=vh)
    batch, resp, real = _token_batch(policy)
    clean, dirty = _token_variants(batch, resp, real, value, PPO_KEYS)
    kw = dict(max_kl_divergence=0.0, conservative_coef=2.0, value_loss_coef=0.5)
    _assert_same(_run(L.conservative_ppo, policy, dirty, **kw), _run(L.conservative_ppo, policy, clean, **kw))
    # without values at all (a zero baseline) and without a reference in the batch
    plain = L.PolicyModel(model, reference_model=ref)
    clean2 = {k: v for k, v in clean.items() if k not in ("values", "old_values", "ref_log_probs")}
    dirty2 = {k: v for k, v in dirty.items() if k not in ("values", "old_values", "ref_log_probs")}
    _assert_same(_run(L.conservative_ppo, plain, dirty2), _run(L.conservative_ppo, plain, clean2))


@pytest.mark.parametrize("value", GARBAGE)
def test_importance_sampling(value):
    model, ref, _, _ = _models()
    policy = L.PolicyModel(model)
    batch, resp, real = _token_batch(policy)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "ref_log_probs", "rewards")}
    with torch.no_grad():
        seq = (policy.token_logprobs(batch["input_ids"], batch["attention_mask"]) * resp).sum(-1)
    batch["behavior_log_probs"] = seq + torch.tensor([-3.0, 0.2, 0.1])  # row 0 clipped
    clean, dirty = _token_variants(batch, resp, real, value, ("ref_log_probs", "rewards"))
    for kw in (dict(beta=0.1), dict(beta=0.1, kl_estimator="abs", log_ratio_clamp=2.0)):
        _assert_same(_run(L.importance_sampling, policy, dirty, **kw), _run(L.importance_sampling, policy, clean, **kw))


# --- GRPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("fused", [True, False])
def test_grpo(value, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref, _, _ = _models()
    B, S, P, Lr = 2, 3, 4, 6
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[1, :2] = 0
    rmask = torch.ones(B, S, Lr, dtype=torch.long)
    rmask[0, 1, 4:] = 0  # a shorter response: positions after it are outside the sequence
    rmask[1, 2, 1:3] = 0  # a masked span inside a response: context, not trained on
    batch = dict(prompt_ids=torch.randint(0, V, (B, P)), prompt_attention_mask=pmask,
                 response_ids=torch.randint(0, V, (B, S, Lr)), response_masks=rmask, rewards=torch.randn(B, S),
                 old_log_probs=-torch.rand(B, S, Lr) - 3.0, ref_log_probs=-torch.rand(B, S, Lr) - 3.0)
    keep = rmask.bool()
    visible = keep.flip(-1).cummax(-1).values.flip(-1)  # ids there are context and must stay
    clean, dirty = dict(batch), dict(batch)
    for k in ("old_log_probs", "ref_log_probs"):
        clean[k], dirty[k] = _fill(batch[k], keep, 0.0), _fill(batch[k], keep, value)
    clean["response_ids"] = _fill(batch["response_ids"], visible, 0)
    dirty["response_ids"] = _fill(batch["response_ids"], visible, None)
    clean["prompt_ids"] = _fill(batch["prompt_ids"], pmask.bool(), 0)
    dirty["prompt_ids"] = _fill(batch["prompt_ids"], pmask.bool(), None)
    for kw in (dict(beta=0.05), dict(beta=0.05, loss_aggregation="seq-mean-token-sum-norm", scale_rewards=False)):
        _assert_same(_run(L.grpo, model, dirty, **kw), _run(L.grpo, model, clean, **kw))


# --- DPO, reward modeling, causal LM: token ids, labels and masks outside the sequence ---------------


def _pair_batch(B=3, Tc=8, Tr=6, prompt=3):
    ca = torch.ones(B, Tc, dtype=torch.long)
    ca[0, -2:] = 0  # right padding
    ra = torch.ones(B, Tr, dtype=torch.long)
    ra[1, :2] = 0  # left padding
    return dict(chosen_input_ids=torch.randint(0, V, (B, Tc)), chosen_attention_mask=ca,
                rejected_input_ids=torch.randint(0, V, (B, Tr)), rejected_attention_mask=ra)


def _pair_variants(batch):
    clean, dirty = dict(batch), dict(batch)
    for side in ("chosen", "rejected"):
        real = batch[f"{side}_attention_mask"].bool()
        clean[f"{side}_input_ids"] = _fill(batch[f"{side}_input_ids"], real, 0)
        dirty[f"{side}_input_ids"] = _fill(batch[f"{side}_input_ids"], real, None)
    return clean, dirty


def test_dpo():
    model, ref, _, _ = _models()
    batch = dict(_pair_batch(), prompt_lengths=torch.full((3,), 3))
    clean, dirty = _pair_variants(batch)
    for side in ("chosen", "rejected"):  # loss masks: 1 inside the response, anything (0 or 1) elsewhere
        attn = batch[f"{side}_attention_mask"]
        resp = (attn.cumsum(-1) - 1 >= 3) & attn.bool()
        clean[f"{side}_loss_mask"] = resp.long()
        dirty[f"{side}_loss_mask"] = torch.where(resp, 1, torch.randint_like(attn, 0, 2))
    _assert_same(_run(L.dpo, model, dirty, reference_model=ref, beta=0.2, label_smoothing=0.1),
                 _run(L.dpo, model, clean, reference_model=ref, beta=0.2, label_smoothing=0.1))


def test_reward_modeling():
    model, _, _, rh = _models(reward_head=True)
    policy = L.PolicyModel(model, reward_head=rh)
    clean, dirty = _pair_variants(_pair_batch())
    _assert_same(_run(L.reward_modeling, policy, dirty), _run(L.reward_modeling, policy, clean))


def test_causal_lm():
    model, _, _, _ = _models()
    B, T = 3, 9
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0
    attn[1, -2:] = 0
    real = attn.bool()
    counted = torch.zeros(B, T, dtype=torch.bool)
    counted[:, 1:] = real[:, 1:] & real[:, :-1]
    counted[:, :4] = False  # a prompt: labels there are ignored
    labels = torch.where(counted, ids, -100)
    clean = dict(input_ids=_fill(ids, real, 0), attention_mask=attn, labels=labels, loss_mask=counted.long())
    dirty = dict(input_ids=_fill(ids, real, None), attention_mask=attn,
                 labels=torch.where(counted, ids, torch.randint_like(ids, 0, V)),  # only loss_mask says "ignored"
                 loss_mask=torch.where(counted | real, counted.long(), torch.randint_like(ids, 0, 2)))
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        _assert_same(_run(L.causal_lm, model, dirty, loss_aggregation=agg),
                     _run(L.causal_lm, model, clean, loss_aggregation=agg))
