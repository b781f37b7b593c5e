import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses import _common
from signalrl.losses.grpo import METRICS

from ._helpers import (
    V, assert_close, assert_float64_match, assert_metrics, double, f64_token_logprobs, frozen_copy, tiny_model,
)

B, S, P, LEN = 2, 3, 4, 5


def make_batch(with_old=True, policy=None):
    prompt = torch.randint(0, V, (B, P))
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[1, :2] = 0  # left-padded prompt
    resp = torch.randint(0, V, (B, S, LEN))
    rmask = torch.ones(B, S, LEN)
    rmask[0, 1, 3:] = 0  # a shorter response
    rmask[1, 2, 4:] = 0
    # a group's rewards are kept apart (offsets 0, 1, 2): in a random group of near-equal rewards float32's rounding of
    # the group mean (~1e-7) becomes an advantage error of ~1e-7 / std, beyond the tests' tolerances
    rewards = 0.5 * torch.randn(B, S) + torch.arange(S, dtype=torch.float32)
    batch = dict(prompt_ids=prompt, prompt_attention_mask=pmask, response_ids=resp, response_masks=rmask,
                 rewards=rewards)
    return batch


def sequences(batch):
    ids, attn, mask = [], [], []
    for b in range(B):
        for s in range(S):
            ids.append(torch.cat([batch["prompt_ids"][b], batch["response_ids"][b, s]]))
            attn.append(torch.cat([batch["prompt_attention_mask"][b], batch["response_masks"][b, s].long()]))
            mask.append(torch.cat([torch.zeros(P, dtype=torch.float64), batch["response_masks"][b, s].double()]))
    return torch.stack(ids), torch.stack(attn), torch.stack(mask)


def oracle(m64, r64, batch, old=None, beta=0.01, clip=0.2, scale=True, eps=1e-6):
    ids, attn, mask = sequences(batch)
    lp, ent = f64_token_logprobs(m64, ids, attn)
    r = batch["rewards"].double()
    mean = r.mean(-1, keepdim=True)
    std = torch.tensor([[float(torch.std(r[b]))] for b in range(B)], dtype=torch.float64)
    A_seq = (r - mean) / (std + eps) if scale else r - mean
    A = A_seq.reshape(B * S, 1) * mask
    old_lp = lp.detach() if old is None else torch.cat([torch.zeros(B, S, P), old], -1).reshape(B * S, P + LEN).double()
    ratio = torch.exp(lp - old_lp)
    unclipped, clipped = -A * ratio, -A * ratio.clamp(1 - clip, 1 + clip)
    n = mask.sum()
    pg = (torch.maximum(unclipped, clipped) * mask).sum() / n
    loss = pg
    kl = torch.zeros((), dtype=torch.float64)
    if r64 is not None:
        with torch.no_grad():
            ref_lp, _ = f64_token_logprobs(r64, ids, attn)
        d = lp - ref_lp
        kl = ((torch.exp(-d) + d - 1) * mask).sum() / n
        loss = loss + beta * kl
    metrics = dict(
        policy_loss=pg, kl_divergence=kl, clip_fraction=((clipped > unclipped).double() * mask).sum() / n,
        entropy=(ent * mask).sum() / n, reward_mean=r.mean(), reward_std=std.mean(), advantage_mean=A_seq.mean(),
        advantage_std=A_seq.flatten().std(),
    )
    return loss, {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in metrics.items()}


def setup():
    model = tiny_model()
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ref


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("with_old", [True, False])
def test_matches_float64_formula(fused, with_old, monkeypatch):
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref = setup()
    batch = make_batch()
    old = None
    if with_old:
        ids, attn, _ = sequences(batch)
        with torch.no_grad():
            lp = L.PolicyModel(model).token_logprobs(ids, attn)
        old = (lp[:, P:] + 0.3 * torch.randn(B * S, LEN)).reshape(B, S, LEN)
        batch["old_log_probs"] = old
    res = L.grpo(model, batch, reference_model=ref, beta=0.05)
    res.loss.backward()
    m64 = double(model)
    loss64, metrics64 = oracle(m64, double(ref), batch, old=old, beta=0.05)
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="loss")
    assert_metrics(res, metrics64, METRICS, rtol=1e-3, atol=1e-6)
    assert_close(model.lm_head.weight.grad, m64.lm_head.weight.grad, rtol=1e-3, atol=1e-7, what="d lm_head")
    assert all(p.grad is None for p in ref.parameters())
    if not with_old:
        assert res.metrics["clip_fraction"] == 0.0
        assert not any("clip fraction" in w for w in res.warnings)


def test_dr_grpo_and_no_reference_when_beta_zero():
    model, ref = setup()
    batch = make_batch()
    res = L.grpo(model, batch, beta=0.0, scale_rewards=False)  # no reference needed
    loss64, metrics64 = oracle(double(model), None, batch, beta=0.0, scale=False)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="Dr. GRPO loss")
    assert_metrics(res, metrics64, METRICS, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        L.grpo(model, batch)  # beta=0.01 by default needs a reference


def test_validation():
    model, ref = setup()
    batch = make_batch()
    with pytest.raises(ValueError, match="Did you mean 'scale_rewards'"):
        L.grpo(model, batch, reference_model=ref, scale_reward=False)
    with pytest.raises(ValueError, match="loss_aggregation"):
        L.grpo(model, batch, reference_model=ref, loss_aggregation="mean")
    with pytest.raises(ValueError, match=r"response_masks.*\[B=2, S=3, L=5\].*\[2, 3, 4\]"):
        L.grpo(model, dict(batch, response_masks=batch["response_masks"][..., :4]), reference_model=ref)
    with pytest.raises(ValueError, match=r"rewards.*\[B=2, S=3\]"):
        L.grpo(model, dict(batch, rewards=torch.randn(2, 4)), reference_model=ref)
    right = dict(batch, prompt_attention_mask=batch["prompt_attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="left-padded"):
        L.grpo(model, right, reference_model=ref)


def test_non_finite_raises_before_backward():
    model, ref = setup()
    batch = make_batch()
    with pytest.raises(ValueError, match="old_log_probs"):  # counted NaN log-probs: the batch check names the key
        L.grpo(model, dict(batch, old_log_probs=torch.full((B, S, LEN), float("nan"))), reference_model=ref)
    stale = torch.full((B, S, LEN), -1e4)  # valid but stale: ρ = inf on negative-advantage tokens without the clamp
    with pytest.raises(L.NonFiniteLossError):
        L.grpo(model, dict(batch, old_log_probs=stale), reference_model=ref, log_ratio_clamp=None)
    assert all(p.grad is None for p in model.parameters())


def test_convergence_high_reward_responses_become_more_likely():
    torch.manual_seed(0)
    model = tiny_model()
    ref = frozen_copy(model)
    batch = make_batch()
    batch["response_masks"] = torch.ones(B, S, LEN)
    batch["prompt_attention_mask"] = torch.ones(B, P, dtype=torch.long)
    batch["rewards"] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ids, attn, mask = sequences(batch)
    policy = L.PolicyModel(model, reference_model=ref)

    def seq_lp():
        with torch.no_grad():
            return (policy.token_logprobs(ids, attn) * mask.float()).sum(-1).reshape(B, S)

    start = seq_lp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = L.GRPOLoss(beta=0.01)
    for _ in range(30):
        opt.zero_grad()
        res = loss_fn(policy, batch)
        res.loss.backward()
        opt.step()
    gain = seq_lp() - start
    assert gain[0, 0] > 2.0 and gain[1, 2] > 2.0, gain
    assert gain[0, 1] < gain[0, 0] and gain[1, 0] < gain[1, 2]


def test_precomputed_reference_log_probs():
    model, ref = setup()
    batch = make_batch()
    full = L.grpo(model, batch, reference_model=ref, beta=0.1)
    ids, attn, _ = sequences(batch)
    ref_lp = L.PolicyModel(ref).token_logprobs(ids, attn).detach()[:, P:].reshape(B, S, LEN)
    pre = L.grpo(model, dict(batch, ref_log_probs=ref_lp), beta=0.1)
    assert_close(pre.loss.detach(), full.loss.detach(), rtol=1e-6, atol=1e-7, what="precomputed reference")


def test_masked_span_inside_a_response_stays_visible_context():
    model, ref = setup()
    batch = make_batch()
    batch["response_masks"] = torch.ones(B, S, LEN)
    batch["response_masks"][0, 0, 1:3] = 0  # e.g. tool output: context, but not trained on
    res = L.grpo(model, batch, beta=0.0)
    ids, attn, mask = sequences(dict(batch, response_masks=torch.ones(B, S, LEN)))  # attention over everything
    mask[0, P + 1:P + 3] = 0
    m64 = double(model)
    lp, _ = f64_token_logprobs(m64, ids, attn)
    r = batch["rewards"].double()
    A = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)).reshape(B * S, 1)
    expected = (-A * mask).sum() / mask.sum()  # ratio 1
    assert_close(res.loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6, what="masked span")


def _left_pad_prompts(batch, k):
    """The same batch with k more left-padding columns on the prompts (any token id there)."""
    out = dict(batch)
    out["prompt_ids"] = torch.cat([torch.randint(0, V, (B, k)), batch["prompt_ids"]], 1)
    out["prompt_attention_mask"] = torch.cat([torch.zeros(B, k, dtype=torch.long), batch["prompt_attention_mask"]], 1)
    return out


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    res = L.grpo(model, batch, **kw)
    res.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return res, grads


@pytest.mark.parametrize("fused", [True, False])
def test_dr_grpo_constant_ignores_prompt_padding(fused, monkeypatch):
    """seq-mean-token-sum-norm divides by B·S·max_completion_length (default L), never by the prompt's width:
    more left padding on the prompts changes neither the loss nor the gradients."""
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref = setup()
    batch = make_batch()
    ids, attn, _ = sequences(batch)
    with torch.no_grad():
        lp = L.PolicyModel(model).token_logprobs(ids, attn)
    batch["old_log_probs"] = (lp[:, P:] + 0.3 * torch.randn(B * S, LEN)).reshape(B, S, LEN).clamp(max=0.0)
    kw = dict(beta=0.05, reference_model=ref, loss_aggregation="seq-mean-token-sum-norm", scale_rewards=False)
    base, g0 = _loss_and_grads(model, batch, **kw)
    for k in (1, 5):
        padded, g1 = _loss_and_grads(model, _left_pad_prompts(batch, k), **kw)
        # sums of ~27 terms of O(1) / 30 that can cancel to ~0: held to 1e-6 of their scale
        assert_close(padded.loss.detach(), base.loss.detach(), rtol=1e-5, atol=1e-6, what=f"loss, {k} more pad columns")
        assert padded.metrics["policy_loss"] == pytest.approx(base.metrics["policy_loss"], rel=1e-5, abs=1e-6)
        for a, b in zip(g1, g0):
            assert_close(a, b, rtol=1e-4, atol=1e-7, what=f"grad, {k} more pad columns")
    # the constant: Σ_tokens ℓ / (B·S·max_completion_length); token-mean is Σ ℓ / Σ m over the same tokens
    kw0 = dict(kw, beta=0.0)
    tm = L.grpo(model, batch, **dict(kw0, loss_aggregation="token-mean"))
    n = float(batch["response_masks"].sum())
    for horizon in (None, LEN, 16):
        res = L.grpo(model, batch, **kw0) if horizon is None else L.grpo(model, batch, max_completion_length=horizon, **kw0)
        expected = tm.metrics["loss"] * n / (B * S * (horizon or LEN))
        assert res.metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-8)
    with pytest.raises(ValueError, match="max_completion_length"):
        L.grpo(model, batch, max_completion_length=0, **kw0)


def test_advantage_epsilon_and_single_sample_groups():
    model, ref = setup()
    batch = make_batch()
    batch["rewards"][0] = torch.tensor([1.0, 1.0 + 1e-4, 1.0 - 1e-4])  # std ~ 1e-4: ε matters
    for eps in (1e-6, 1e-4):
        res = L.grpo(model, batch, beta=0.0, advantage_epsilon=eps)
        loss64, metrics64 = oracle(double(model), None, batch, beta=0.0, eps=eps)
        assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what=f"advantage_epsilon={eps}")
        assert_metrics(res, metrics64, METRICS, rtol=1e-3, atol=1e-6)
    assert L.get_loss("grpo").defaults["advantage_epsilon"] == 1e-6
    # a group of one sample has no baseline: A = 0 (scaled or not), so no policy gradient
    one = {k: (v[:, :1] if k in ("response_ids", "response_masks", "rewards") else v) for k, v in batch.items()}
    for scale in (True, False):
        res, grads = _loss_and_grads(model, one, beta=0.0, scale_rewards=scale)
        assert res.metrics["advantage_mean"] == 0.0 and res.metrics["advantage_std"] == 0.0
        assert res.metrics["loss"] == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("fused", [True, False])
def test_log_ratio_clamp(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(_common, "_fused_ppo_op", lambda: None)
    model, ref = setup()
    batch = make_batch()
    ids, attn, _ = sequences(batch)
    with torch.no_grad():
        lp = L.PolicyModel(model).token_logprobs(ids, attn)[:, P:].reshape(B, S, LEN)
    assert L.get_loss("grpo").defaults["log_ratio_clamp"] == 20.0
    # moderate ratios: the default clamp (20) changes nothing
    near = dict(batch, old_log_probs=(lp + 0.3 * torch.randn(B, S, LEN)).clamp(max=0.0))
    a, b = L.grpo(model, near, beta=0.0), L.grpo(model, near, beta=0.0, log_ratio_clamp=None)
    assert a.metrics == b.metrics
    # a stale old log-prob of −1e4 on a negative-advantage token: ρ = e^(~1e4) overflows without the clamp
    r = batch["rewards"]
    s_neg = int(torch.argmin(r[0]))
    stale = near["old_log_probs"].clone()
    stale[0, s_neg, 0] = -1e4
    far = dict(near, old_log_probs=stale)
    with pytest.raises(L.NonFiniteLossError):
        L.grpo(model, far, beta=0.0, log_ratio_clamp=None)
    res, grads = _loss_and_grads(model, far, beta=0.0)
    assert math.isfinite(res.metrics["loss"]) and all(torch.isfinite(g).all() for g in grads)
    # the clamp is the ratio's: log ρ beyond ±c is c (here c = 0.1 against an explicit oracle)
    c = 0.1
    res = L.grpo(model, near, beta=0.0, log_ratio_clamp=c)
    clamped_old = (lp.double() - (lp.double() - near["old_log_probs"].double()).clamp(-c, c))
    loss64, _ = oracle(double(model), None, batch, old=clamped_old, beta=0.0)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="clamped ratio")


def test_float64_model_matches_formula_to_1e_12():
    """A float64 model computes in float64 throughout (batch tensors are not cast to float32)."""
    model, ref = setup()
    batch = make_batch()
    ids, attn, _ = sequences(batch)
    with torch.no_grad():
        lp = L.PolicyModel(model).token_logprobs(ids, attn)
    old = (lp[:, P:] + 0.3 * torch.randn(B * S, LEN)).reshape(B, S, LEN).clamp(max=0.0)
    batch["old_log_probs"] = old
    m64, r64, o64 = double(model), double(ref), double(model)
    res = L.grpo(m64, batch, reference_model=r64, beta=0.05)
    res.loss.backward()
    loss64, metrics64 = oracle(o64, r64, batch, old=old, beta=0.05)
    loss64.backward()
    assert_float64_match(res, loss64, metrics64, METRICS, m64.named_parameters(), o64.parameters())
