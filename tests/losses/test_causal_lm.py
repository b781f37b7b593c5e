import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses.causal_lm import METRICS

from ._helpers import (
    V, assert_close, assert_float64_match, assert_metrics, double, f64_token_logprobs, shifted_mask, tiny_model,
)

B, T = 3, 9


def make_batch():
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0  # left padding
    attn[1, -2:] = 0  # right padding
    return dict(input_ids=ids, attention_mask=attn)


def oracle(m64, batch, count):
    lp, _ = f64_token_logprobs(m64, batch["input_ids"], batch["attention_mask"])
    nll = -(lp * count).sum() / count.sum()
    return nll, dict(perplexity=torch.exp(nll.detach()), num_tokens=count.sum())


def test_matches_float64_formula():
    model = tiny_model()
    batch = make_batch()
    res = L.causal_lm(model, batch)
    res.loss.backward()
    m64 = double(model)
    count = shifted_mask(batch["attention_mask"])
    loss64, metrics64 = oracle(m64, batch, count)
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-5, atol=1e-6, what="loss")
    assert_metrics(res, dict(metrics64, loss=loss64.detach()), METRICS, rtol=1e-4, atol=1e-6)
    assert res.metrics["num_tokens"] == float(count.sum())
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        g32 = dict(model.named_parameters())[name].grad
        g64 = dict(m64.named_parameters())[name].grad
        assert_close(g32, g64, rtol=1e-3, atol=1e-7, what=f"d {name}")


def test_same_as_hugging_face_loss():
    model = tiny_model()
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones_like(ids)
    ours = L.causal_lm(model, dict(input_ids=ids, attention_mask=attn, labels=ids))
    theirs = model(input_ids=ids, attention_mask=attn, labels=ids).loss
    assert ours.metrics["loss"] == pytest.approx(float(theirs.detach()), rel=1e-5)


def test_labels_and_loss_mask():
    model = tiny_model()
    batch = make_batch()
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100  # a prompt
    loss_mask = torch.ones(B, T, dtype=torch.long)
    loss_mask[2, -1] = 0
    res = L.causal_lm(model, dict(batch, labels=labels, loss_mask=loss_mask))
    count = shifted_mask(batch["attention_mask"]) * (labels != -100).double() * loss_mask.double()
    loss64, metrics64 = oracle(double(model), batch, count)
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-5, atol=1e-6, what="masked loss")
    assert res.metrics["num_tokens"] == float(count.sum())
    # labels different from input_ids are the targets
    other = torch.randint(0, V, (B, T))
    res2 = L.causal_lm(model, dict(batch, labels=other))
    lp_all = torch.log_softmax(double(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits, -1)
    lp = lp_all[:, :-1].gather(-1, other[:, 1:, None]).squeeze(-1)
    c = shifted_mask(batch["attention_mask"])[:, 1:]
    assert res2.metrics["loss"] == pytest.approx(float((-(lp * c).sum() / c.sum()).detach()), rel=1e-4)


def test_validation():
    model = tiny_model()
    batch = make_batch()
    with pytest.raises(ValueError, match="Did you mean 'loss_aggregation'"):
        L.causal_lm(model, batch, loss_agregation="token-mean")
    with pytest.raises(ValueError, match="unknown keyword argument 'beta'"):
        L.causal_lm(model, batch, beta=0.1)
    with pytest.raises(ValueError, match=r"labels.*\[B=3, T=9\].*\[3, 8\]"):
        L.causal_lm(model, dict(batch, labels=batch["input_ids"][:, 1:]))
    with pytest.raises(TypeError, match="labels"):
        L.causal_lm(model, dict(batch, labels=batch["input_ids"].float()))
    with pytest.raises(ValueError, match="Did you mean 'labels'"):
        L.causal_lm(model, dict(batch, label=batch["input_ids"]))


def test_all_masked_is_zero_not_nan():
    model = tiny_model()
    batch = make_batch()
    res = L.causal_lm(model, dict(batch, loss_mask=torch.zeros(B, T)))
    assert res.metrics["loss"] == 0.0 and res.metrics["num_tokens"] == 0.0 and res.metrics["perplexity"] == 1.0


def test_non_finite_raises_before_backward():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(L.NonFiniteLossError):
        L.causal_lm(model, make_batch())
    assert all(p.grad is None for p in model.parameters())


def test_convergence_loss_goes_down():
    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch()
    loss_fn = L.CausalLMLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        res = loss_fn(model, batch)
        first = first or res.metrics
        res.loss.backward()
        opt.step()
    assert res.metrics["loss"] < 0.3 * first["loss"]
    assert res.metrics["perplexity"] == pytest.approx(math.exp(res.metrics["loss"]), rel=1e-5)


def test_float64_model_matches_formula_to_1e_12():
    model = tiny_model()
    batch = make_batch()
    m64, o64 = double(model), double(model)
    res = L.causal_lm(m64, batch)
    res.loss.backward()
    count = shifted_mask(batch["attention_mask"])
    loss64, metrics64 = oracle(o64, batch, count)
    loss64.backward()
    assert_float64_match(res, loss64, dict(metrics64, loss=loss64.detach()), METRICS,
                         m64.named_parameters(), o64.parameters())
