"""The nn.Module losses equal their plain-PyTorch formulas from full logits (values and gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from signalrl.integrations import LinearCrossEntropyLoss, LinearDPOLoss, LinearGRPOLoss

V, H = 300, 32


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _inputs(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100
    targets[2, -3:] = -100
    return hidden, weight, targets


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-3))


def _ref_logprobs(hidden, weight, targets, bias=None, temperature=1.0):
    z = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    lp = torch.log_softmax(z, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, lp, torch.zeros_like(lp))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "items"])
def test_linear_cross_entropy(reduction):
    hidden, weight, targets = _inputs()
    bias = torch.randn(V) * 0.1
    h1, w1, b1 = _leaf(hidden), _leaf(weight), _leaf(bias)
    h2, w2, b2 = _leaf(hidden), _leaf(weight), _leaf(bias)
    logits = (h2 @ w2.T + b2).reshape(-1, V)
    t = targets.reshape(-1)
    if reduction == "items":
        got = LinearCrossEntropyLoss()(h1, w1, targets, b1, num_items_in_batch=torch.tensor(11))
        want = F.cross_entropy(logits, t, reduction="sum") / 11
    else:
        got = LinearCrossEntropyLoss(reduction=reduction)(h1, w1, targets, b1)
        want = F.cross_entropy(logits, t, reduction=reduction)
        if reduction == "none":
            want = want.reshape(targets.shape)
    assert got.dtype == torch.float32
    _close(got, want)
    s = torch.randn_like(got) if reduction == "none" else 1.0
    for a, b in zip(_grads((got * s).sum(), h1, w1, b1), _grads((want * s).sum(), h2, w2, b2)):
        _close(a, b)
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(reduction="avg")


def _ref_grpo(lp, old, adv, mask, ref, beta, eps_low, eps_high, aggregation, horizon):
    """TRL's GRPO per-token loss and aggregations, from log-probs."""
    ratio = torch.exp(lp - old)
    per_tok = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if beta:
        per_tok = per_tok + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    m = mask
    if aggregation == "token-mean":
        return (per_tok * m).sum() / m.sum().clamp(min=1)
    if aggregation == "seq-mean-token-mean":
        rows = m.sum(-1) > 0
        return ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1))[rows].mean()
    if aggregation == "seq-mean-token-sum":
        rows = m.sum(-1) > 0
        return (per_tok * m).sum(-1)[rows].mean()
    return (per_tok * m).sum() / (m.shape[0] * horizon)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_linear_grpo(aggregation, beta):
    hidden, weight, targets = _inputs()
    B, T = targets.shape
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    with torch.no_grad():
        lp0 = _ref_logprobs(hidden, weight, targets)
    old = lp0 + 0.3 * torch.randn(B, T, generator=g)  # ratios inside and outside the clip range
    ref = lp0 + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    counted = mask * (targets != -100)
    loss_fn = LinearGRPOLoss(beta=beta, clip_epsilon=0.2, clip_epsilon_high=0.28, loss_aggregation=aggregation,
                             log_ratio_clamp=None, max_completion_length=9)
    h1, w1, h2, w2 = _leaf(hidden), _leaf(weight), _leaf(hidden), _leaf(weight)
    got, metrics = loss_fn(h1, w1, targets, old, adv, mask, ref_logprobs=ref if beta else None)
    want = _ref_grpo(_ref_logprobs(h2, w2, targets), old, adv[:, None], counted, ref, beta, 0.2, 0.28,
                     aggregation, horizon=9)
    _close(got, want)
    for a, b in zip(_grads(got, h1, w1), _grads(want, h2, w2)):
        _close(a, b)
    assert set(metrics) >= {"policy_loss", "kl_divergence", "clip_fraction", "entropy"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_linear_grpo_from_rewards_and_current_policy():
    hidden, weight, targets = _inputs(B=4)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    got, _ = LinearGRPOLoss(beta=0.0)(hidden, weight, targets, rewards=rewards, num_generations=2)
    r = rewards.view(2, 2)
    adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)).reshape(4)
    # ratio 1: the loss is −mean_token(A)
    counted = (targets != -100).float()
    torch.testing.assert_close(got, -(adv[:, None] * counted).sum() / counted.sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        LinearGRPOLoss(beta=0.1)(hidden, weight, targets, advantages=torch.ones(4))
    with pytest.raises(ValueError, match="clip_epsilon"):
        LinearGRPOLoss(clip_eps=0.2)  # did-you-mean, as the named loss


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_dpo(label_smoothing):
    hidden, weight, targets = _inputs(B=4, T=6)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    beta = 0.5
    h1, w1, h2, w2 = _leaf(hidden), _leaf(weight), _leaf(hidden), _leaf(weight)
    loss_fn = LinearDPOLoss(beta=beta, label_smoothing=label_smoothing)
    got, metrics = loss_fn(h1, w1, targets, ref_hidden=ref_hidden)
    seq = _ref_logprobs(h2, w2, targets).sum(-1)
    with torch.no_grad():
        ref = _ref_logprobs(ref_hidden, weight, targets).sum(-1)
    hd = (seq[:2] - ref[:2]) - (seq[2:] - ref[2:])
    want = ((1 - label_smoothing) * F.softplus(-beta * hd) + label_smoothing * F.softplus(beta * hd)).mean()
    _close(got, want)
    for a, b in zip(_grads(got, h1, w1), _grads(want, h2, w2)):
        _close(a, b)
    # a difference of sequence log-prob sums: float32 holds it to the sums' size, not to the (small) margin's
    scale = beta * max(seq.abs().max().item(), ref.abs().max().item())
    torch.testing.assert_close(metrics["reward_margin"], (beta * hd).mean().detach(), rtol=1e-5, atol=1e-5 * scale)
    # the same from precomputed reference log-probs, and from (chosen, rejected) pairs of different lengths
    again, _ = loss_fn(hidden, weight, targets, ref[:2], ref[2:])
    _close(again, want.detach())
    pair, _ = loss_fn((hidden[:2], hidden[2:, :4]), weight, (targets[:2], targets[2:, :4]), ref[:2],
                      _ref_logprobs(ref_hidden[2:, :4], weight, targets[2:, :4]).sum(-1))
    assert torch.isfinite(pair)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        loss_fn(hidden, weight, targets)
