import copy
import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses.reward_modeling import METRICS

from ._helpers import H, V, assert_close, assert_float64_match, assert_metrics, double, f64_hidden, tiny_model

B = 4


def make_batch(Tc=7, Tr=5):
    ca = torch.ones(B, Tc, dtype=torch.long)
    ca[0, -2:] = 0  # right padding
    ra = torch.ones(B, Tr, dtype=torch.long)
    ra[1, :2] = 0  # left padding
    return dict(chosen_input_ids=torch.randint(0, V, (B, Tc)), chosen_attention_mask=ca,
                rejected_input_ids=torch.randint(0, V, (B, Tr)), rejected_attention_mask=ra)


def rewards64(m64, head64, ids, attn):
    hid = f64_hidden(m64, ids, attn)
    out = []
    for b in range(ids.shape[0]):
        last = max(t for t in range(ids.shape[1]) if attn[b, t])
        out.append(hid[b, last] @ head64.linear.weight[0] + head64.linear.bias[0])
    return torch.stack(out)


def oracle(m64, head64, batch, margin=1.0, temperature=0.1):
    rw = rewards64(m64, head64, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    rl = rewards64(m64, head64, batch["rejected_input_ids"], batch["rejected_attention_mask"])
    # P(chosen ≻ rejected) = σ((r_w − r_l)/temperature); the margin is subtracted from that logit
    loss = -torch.log(torch.sigmoid((rw - rl) / temperature - margin)).mean()
    d = lambda x: x.detach()  # noqa: E731
    metrics = dict(preference_accuracy=(rw > rl).double().mean(), reward_margin=d(rw - rl).mean(),
                   chosen_reward_mean=d(rw).mean(), rejected_reward_mean=d(rl).mean(),
                   chosen_reward_std=d(rw).std(unbiased=False), rejected_reward_std=d(rl).std(unbiased=False))
    return loss, metrics


def setup():
    model = tiny_model()
    head = L.RewardHead(H)
    return model, head, L.PolicyModel(model, reward_head=head)


@pytest.mark.parametrize("margin,temperature", [(1.0, 0.1), (0.0, 1.0), (2.5, 0.5)])
def test_matches_float64_formula(margin, temperature):
    model, head, policy = setup()
    batch = make_batch()
    res = L.reward_modeling(policy, batch, margin=margin, temperature=temperature)
    res.loss.backward()
    m64, h64 = double(model), double(head)
    loss64, metrics64 = oracle(m64, h64, batch, margin, temperature)
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-4, atol=1e-6, what="loss")
    assert_metrics(res, metrics64, METRICS, rtol=1e-3, atol=1e-6)
    assert_close(head.linear.weight.grad, h64.linear.weight.grad, rtol=1e-3, atol=1e-7, what="d head")
    q = model.model.layers[1].mlp.up_proj.weight
    assert_close(q.grad, m64.model.layers[1].mlp.up_proj.weight.grad, rtol=1e-3, atol=1e-7, what="d backbone")
    assert model.lm_head.weight.grad is None  # the LM head plays no part in a reward model


def test_how_the_margin_enters():
    model, head, policy = setup()
    batch = make_batch()
    with torch.no_grad():  # equal rewards: the loss is log(1 + e^margin), whatever the temperature
        head.linear.weight.zero_()
    for margin in (0.0, 1.0, 3.0):
        for temperature in (0.1, 2.0):
            res = L.reward_modeling(policy, batch, margin=margin, temperature=temperature)
            assert res.metrics["loss"] == pytest.approx(math.log1p(math.exp(margin)), rel=1e-5)
    # shifting the margin by m is the same as lowering the reward gap by m·temperature
    model, head, policy = setup()
    a = L.reward_modeling(policy, batch, margin=2.0, temperature=0.5)
    with torch.no_grad():
        rw = policy.sequence_rewards(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        rl = policy.sequence_rewards(batch["rejected_input_ids"], batch["rejected_attention_mask"])
    expected = torch.nn.functional.softplus(-((rw - rl - 2.0 * 0.5) / 0.5)).mean()
    assert a.metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_validation_and_needs_a_reward_head():
    model, head, policy = setup()
    batch = make_batch()
    with pytest.raises(ValueError, match="Did you mean 'margin'"):
        L.reward_modeling(policy, batch, margn=1.0)
    with pytest.raises(ValueError, match="temperature"):
        L.reward_modeling(policy, batch, temperature=0.0)
    with pytest.raises(ValueError, match="unknown batch key 'prompt_lengths'"):
        L.reward_modeling(policy, dict(batch, prompt_lengths=torch.ones(B, dtype=torch.long)))
    with pytest.raises(TypeError, match="chosen_input_ids"):
        L.reward_modeling(policy, dict(batch, chosen_input_ids=batch["chosen_input_ids"].float()))
    with pytest.raises(ValueError, match="reward head"):
        L.reward_modeling(model, batch)
    assert L.get_loss("reward_modeling").needs_reward_head


def test_non_finite_raises_before_backward():
    model, head, policy = setup()
    with torch.no_grad():
        head.linear.bias.fill_(float("inf"))
    with pytest.raises(L.NonFiniteLossError):
        L.reward_modeling(policy, make_batch())
    assert all(p.grad is None for p in policy.parameters())


def test_convergence_preferences_are_learned():
    torch.manual_seed(0)
    model, head, policy = setup()
    batch = make_batch(Tc=6, Tr=6)
    loss_fn = L.RewardModelingLoss(reward_head=head)
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=3e-3)
    first = None
    for _ in range(30):
        opt.zero_grad()
        res = loss_fn(model, batch)
        first = first or res.metrics
        res.loss.backward()
        opt.step()
    assert res.metrics["loss"] < 0.3 * first["loss"]
    assert res.metrics["preference_accuracy"] == 1.0 and res.metrics["reward_margin"] > 0.1


def test_float64_model_matches_formula_to_1e_12():
    model, head, policy = setup()
    batch = make_batch()
    m64, h64, o64, oh64 = double(model), double(head), double(model), double(head)
    res = L.reward_modeling(L.PolicyModel(m64, reward_head=h64), batch, margin=2.5, temperature=0.5)
    res.loss.backward()
    loss64, metrics64 = oracle(o64, oh64, batch, 2.5, 0.5)
    loss64.backward()
    assert_float64_match(res, loss64, metrics64, METRICS,
                         list(m64.named_parameters()) + list(h64.named_parameters()),
                         list(o64.parameters()) + list(oh64.parameters()))


def previous_formula(policy, batch, margin, temperature):
    """The loss as it was written before the bias became a constant: r with the bias in the graph."""
    from signalrl.losses.dpo import pair_batch

    ids, attn, _ = pair_batch(batch)
    r = policy.sequence_rewards(ids, attn)
    rw, rl = r[:B], r[B:]
    loss = torch.nn.functional.softplus(-((rw - rl) / temperature - margin)).mean()
    d = lambda x: x.detach()  # noqa: E731
    metrics = dict(preference_accuracy=(rw > rl).to(r.dtype).mean(), reward_margin=d(rw - rl).mean(),
                   chosen_reward_mean=d(rw).mean(), rejected_reward_mean=d(rl).mean(),
                   chosen_reward_std=d(rw).std(unbiased=False), rejected_reward_std=d(rl).std(unbiased=False))
    return loss, metrics


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bias_gradient_is_exactly_zero_and_nothing_else_changes(dtype):
    """b cancels in r_w − r_l: its gradient is exactly 0 (not rounding noise), while the loss, every metric and
    every other gradient are those of the formula with b in the graph, bit for bit."""
    model, head, _ = setup()
    with torch.no_grad():
        head.linear.bias.fill_(0.37)  # a bias that is not 0, so it is in every reward
    if dtype == torch.float64:
        model, head = double(model), double(head)
    batch = make_batch(Tc=9, Tr=6)
    m2 = copy.deepcopy(model)
    h2 = copy.deepcopy(head)
    res = L.reward_modeling(L.PolicyModel(model, reward_head=head), batch, margin=1.5, temperature=0.3)
    res.loss.backward()
    loss0, metrics0 = previous_formula(L.PolicyModel(m2, reward_head=h2), batch, 1.5, 0.3)
    loss0.backward()
    assert h2.linear.bias.grad is not None and float(h2.linear.bias.grad.abs().max()) < 1e-6  # the old noise
    g = head.linear.bias.grad
    assert g is not None and torch.equal(g, torch.zeros_like(g))  # a zero gradient, not None
    assert torch.equal(res.loss.detach(), loss0.detach())
    for k, v in metrics0.items():
        assert res.metrics[k] == float(v), k
    for (n, p), q in zip(list(model.named_parameters()) + list(head.linear.named_parameters(prefix="head")),
                         list(m2.parameters()) + list(h2.linear.parameters())):
        if n == "head.bias":
            continue
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
    # outside the loss the head is the plain affine map (the bias has its gradient)
    head.zero_grad()
    r = L.PolicyModel(model, reward_head=head).sequence_rewards(batch["chosen_input_ids"],
                                                                batch["chosen_attention_mask"])
    r.sum().backward()
    assert float(head.linear.bias.grad) == B
