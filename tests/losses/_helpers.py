"""Tiny models and float64 oracles for the loss tests (independent of signalrl.losses)."""
from __future__ import annotations

import copy
import math
import warnings

import torch
import transformers

warnings.filterwarnings("ignore", category=FutureWarning)

V, H = 64, 32


def tiny_config(**overrides):
    cfg = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    cfg.update(overrides)
    return transformers.LlamaConfig(**cfg)


def tiny_model(**overrides):
    return transformers.LlamaForCausalLM(tiny_config(**overrides))


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref


def double(module):
    return copy.deepcopy(module).double()


def positions(attn):
    return (attn.long().cumsum(-1) - 1).clamp_min(0)


def f64_logits(model64, ids, attn):
    out = model64(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False)
    return out.logits.double()


def f64_hidden(model64, ids, attn):
    dec = model64.get_decoder()
    return dec(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False).last_hidden_state


def f64_token_logprobs(model64, ids, attn, temperature=1.0):
    """(logprobs, entropy) [B, T] float64, entry t = log p(ids[t] | ids[<t]), entry 0 = 0 (all positions)."""
    return logprobs_from_logits(f64_logits(model64, ids, attn), ids, temperature)


def logprobs_from_logits(logits, ids, temperature=1.0):
    """(logprobs, entropy) [B, T] float64 from full logits [B, T, V] (entry 0 = 0)."""
    logits = logits.double() / temperature
    logp_all = torch.log_softmax(logits[:, :-1], -1)
    lp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    z = torch.zeros(ids.shape[0], 1, dtype=torch.float64)
    return torch.cat([z, lp], 1), torch.cat([z, ent], 1)


def shifted_mask(attn):
    m = attn.double()
    out = torch.zeros_like(m)
    out[:, 1:] = m[:, 1:] * m[:, :-1]
    return out


def masked_mean(x, m):
    return (x * m).sum() / m.sum()


def gae_loop(rewards, values, mask, gamma, lam):
    """Straightforward per-row GAE over the masked positions, float64."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * nxt_v - float(values[b, t])
            a = delta + gamma * lam * nxt_a
            adv[b, t] = a
            nxt_v, nxt_a = float(values[b, t]), a
    returns = (adv + values.double()) * mask
    return adv, returns


def assert_close(a, b, rtol=1e-4, atol=1e-5, what=""):
    """Scalars: |a − b| ≤ atol + rtol·|b|. Tensors (gradients): ‖a − b‖ ≤ rtol·‖b‖ + atol·√n, the norm-wise
    criterion of METHOD.md — element-wise tolerances fail at random on the elements that are ~0."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if a.numel() <= 1:
        ok = torch.allclose(a, b, rtol=rtol, atol=atol)
    else:
        ok = (a - b).norm() <= rtol * b.norm() + atol * a.numel() ** 0.5
    assert ok, (f"{what}: max abs err {(a - b).abs().max():.3g}, "
                f"norm-relative err {((a - b).norm() / b.norm().clamp_min(1e-300)):.3g}")


def assert_metrics(result, expected: dict, names, rtol=1e-4, atol=1e-5):
    assert set(result.metrics) == set(names), f"metric names {sorted(result.metrics)} != {sorted(names)}"
    for k, v in result.metrics.items():
        assert isinstance(v, float), f"{k} is {type(v)}"
    for k, v in expected.items():
        got = result.metrics[k]
        assert math.isclose(got, float(v), rel_tol=rtol, abs_tol=atol), f"{k}: {got} vs {float(v)}"


def ppo_oracle(pol64, ref64, head64, ids, attn, old, rewards, mask, *, values=None, old_values=None, gamma=0.99,
               lam=0.95, clip=0.2, clip_high=None, vf_coef=0.5, ent_coef=0.01, beta=0.01, v_clip=0.2,
               normalize=True, use_gae=True, conservative=None, dual_clip=None, estimator="k3", agg="token-mean"):
    """enhanced_ppo (and conservative_ppo with conservative=(coef, max_kl)) in float64, written out."""
    clip_high = clip if clip_high is None else clip_high
    # one backbone pass for the log-probs and the values, as the loss does: HF's float64 Llama runs its RMSNorm
    # in float32, so one backward of a sum and two backwards summed differ by ~1e-7
    hid = f64_hidden(pol64, ids, attn)
    lp, ent = logprobs_from_logits(pol64.lm_head(hid), ids)
    ref_lp = f64_token_logprobs(ref64, ids, attn)[0] if ref64 is not None else None
    if head64 is not None:
        v = torch.zeros(ids.shape, dtype=torch.float64)
        v = torch.cat([v[:, :1], (hid[:, :-1] @ head64.linear.weight.t()).squeeze(-1) + head64.linear.bias], 1)
    else:
        v = values.double()
    rollout_v = values.double() if values is not None else v.detach()
    adv, ret = gae_loop(rewards, rollout_v, mask, gamma, lam if use_gae else 1.0)
    n = mask.sum()
    adv_mean = (adv * mask).sum() / n
    adv_var = (((adv - adv_mean) ** 2) * mask).sum() / (n - 1)
    A = (adv - adv_mean) / torch.sqrt(adv_var + 1e-8) * mask if normalize else adv
    ratio = torch.exp(lp - old.double())
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1 - clip, 1 + clip_high)
    pg_tok = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        pg_tok = torch.where(A < 0, torch.minimum(pg_tok, -A * dual_clip), pg_tok)

    def aggregate(x):  # over the T − 1 predicted positions
        x, m = x[:, 1:], mask[:, 1:]
        rows = m.sum(-1)
        if agg == "token-mean":
            return (x * m).sum() / m.sum()
        if agg == "seq-mean-token-mean":
            return ((x * m).sum(-1) / rows).sum() / (rows > 0).sum()
        if agg == "seq-mean-token-sum":
            return (x * m).sum() / (rows > 0).sum()
        return (x * m).sum() / x.numel()

    pg = aggregate(pg_tok)
    ov = (old_values.double() if old_values is not None else rollout_v)
    vc = ov + (v - ov).clamp(-v_clip, v_clip)
    vl = 0.5 * aggregate(torch.maximum((v - ret) ** 2, (vc - ret) ** 2))
    H_mean = masked_mean(ent, mask)
    kl = kl_agg = torch.zeros((), dtype=torch.float64)
    if ref_lp is not None:
        d = lp - ref_lp
        kl_tok = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1, "abs": d.abs()}[estimator]
        kl, kl_agg = masked_mean(kl_tok, mask), aggregate(kl_tok)
    loss = pg + vf_coef * vl - ent_coef * aggregate(ent) + beta * kl_agg
    metrics = {}
    if conservative is not None:
        coef, max_kl = conservative
        pen = coef * torch.relu(kl - max_kl) ** 2
        loss = loss + pen
        metrics.update(kl_violation=float(kl > max_kl), kl_penalty=pen, max_kl_threshold=max_kl)
    with torch.no_grad():
        def var(x):
            mu = (x * mask).sum() / n
            return (((x - mu) ** 2) * mask).sum() / (n - 1)
        metrics.update(
            policy_loss=pg, value_loss=vl, entropy=H_mean, kl_divergence=kl,
            approx_kl=masked_mean(ratio - 1 - torch.log(ratio), mask),
            clip_fraction=masked_mean((clipped > unclipped).double(), mask),
            advantage_mean=adv_mean, advantage_std=adv_var.sqrt(),
            explained_variance=1 - var(ret - v) / var(ret), value_mean=masked_mean(v, mask),
            return_mean=masked_mean(ret, mask), reward_mean=(rewards.double() * mask).sum(-1).mean(),
        )
        metrics = {k: float(x) for k, x in metrics.items()}
    return loss, metrics


def assert_float64_match(res, loss64, metrics64, names, named_params, oracle_params, tol=1e-12):
    """A float64 loss result equals the float64 oracle's: loss dtype and value, every metric, every gradient."""
    assert res.loss.dtype == torch.float64
    assert_close(res.loss.detach(), loss64.detach(), rtol=tol, atol=tol, what="loss")
    assert_metrics(res, metrics64, names, rtol=tol, atol=tol)
    for (name, p), q in zip(named_params, oracle_params):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad, rtol=tol, atol=tol, what=f"d {name}")
