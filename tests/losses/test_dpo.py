import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses.dpo import METRICS

from ._helpers import (
    V, assert_close, assert_float64_match, assert_metrics, double, f64_token_logprobs, frozen_copy, tiny_model,
)


def make_batch(B=3, Tc=8, Tr=6, prompt=3):
    prompt_ids = torch.randint(0, V, (B, prompt))
    chosen = torch.cat([prompt_ids, torch.randint(0, V, (B, Tc - prompt))], 1)
    rejected = torch.cat([prompt_ids, torch.randint(0, V, (B, Tr - prompt))], 1)
    ca = torch.ones(B, Tc, dtype=torch.long)
    ra = torch.ones(B, Tr, dtype=torch.long)
    ca[0, -2:] = 0  # right padding in one chosen row
    return dict(chosen_input_ids=chosen, chosen_attention_mask=ca, rejected_input_ids=rejected,
                rejected_attention_mask=ra, prompt_lengths=torch.full((B,), prompt))


def response_mask64(attn, prompt):
    T = attn.shape[1]
    m = torch.zeros(attn.shape, dtype=torch.float64)
    for b in range(attn.shape[0]):
        for t in range(prompt, T):  # rows here are not left-padded: position = index
            if attn[b, t] and attn[b, t - 1]:
                m[b, t] = 1.0
    return m


def oracle(m64, r64, batch, beta, eps, prompt):
    def seq(model, side):
        ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        lp, _ = f64_token_logprobs(model, ids, attn)
        return (lp * response_mask64(attn, prompt)).sum(-1)

    pw, pl = seq(m64, "chosen"), seq(m64, "rejected")
    with torch.no_grad():
        rw, rl = seq(r64, "chosen"), seq(r64, "rejected")
    h = (pw - rw) - (pl - rl)
    loss = ((1 - eps) * -torch.log(torch.sigmoid(beta * h)) + eps * -torch.log(torch.sigmoid(-beta * h))).mean()
    cr, rr = beta * (pw - rw).detach(), beta * (pl - rl).detach()
    metrics = dict(implicit_reward=torch.cat([cr, rr]).mean(), chosen_reward=cr.mean(), rejected_reward=rr.mean(),
                   reward_margin=(cr - rr).mean(), preference_accuracy=(cr > rr).double().mean())
    return loss, metrics, (pw - rw).detach(), (pl - rl).detach()


def setup():
    model = tiny_model()
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, ref


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_matches_float64_formula(beta, eps):
    model, ref = setup()
    batch = make_batch()
    res = L.dpo(model, batch, beta=beta, label_smoothing=eps, reference_model=ref)
    res.loss.backward()
    m64 = double(model)
    loss64, metrics64, _, _ = oracle(m64, double(ref), batch, beta, eps, prompt=3)
    loss64.backward()
    assert_close(res.loss.detach(), loss64.detach(), rtol=1e-5, atol=1e-6, what="loss")
    assert_metrics(res, metrics64, METRICS, rtol=1e-4, atol=1e-6)
    assert_close(model.lm_head.weight.grad, m64.lm_head.weight.grad, rtol=1e-3, atol=1e-7, what="d lm_head")
    assert_close(model.model.embed_tokens.weight.grad, m64.model.embed_tokens.weight.grad, rtol=1e-3, atol=1e-7,
                 what="d embeddings")
    assert all(p.grad is None for p in ref.parameters())


def test_precomputed_reference_and_loss_masks():
    model, ref = setup()
    batch = make_batch()
    full = L.dpo(model, batch, reference_model=ref)
    # with precomputed reference sequence log-probs no reference is needed
    m64, r64 = double(model), double(ref)
    pw = (f64_token_logprobs(r64, batch["chosen_input_ids"], batch["chosen_attention_mask"])[0]
          * response_mask64(batch["chosen_attention_mask"], 3)).sum(-1)
    pl = (f64_token_logprobs(r64, batch["rejected_input_ids"], batch["rejected_attention_mask"])[0]
          * response_mask64(batch["rejected_attention_mask"], 3)).sum(-1)
    pre = L.dpo(model, dict(batch, ref_chosen_log_probs=pw.float(), ref_rejected_log_probs=pl.float()))
    assert_close(pre.loss.detach(), full.loss.detach(), rtol=1e-5, atol=1e-6, what="precomputed ref")
    # loss masks equal to the prompt-length masks give the same loss
    no_pl = {k: v for k, v in batch.items() if k != "prompt_lengths"}
    masks = dict(chosen_loss_mask=response_mask64(batch["chosen_attention_mask"], 3).long(),
                 rejected_loss_mask=response_mask64(batch["rejected_attention_mask"], 3).long())
    via_masks = L.dpo(model, dict(no_pl, **masks), reference_model=ref)
    assert_close(via_masks.loss.detach(), full.loss.detach(), rtol=1e-6, atol=1e-7, what="loss masks")
    # without either, every predicted token counts (prompt included): the shared prompt cancels in h,
    # so the loss is unchanged, but each side's implicit reward includes the prompt tokens
    everything = L.dpo(model, no_pl, reference_model=ref)
    assert abs(everything.metrics["loss"] - full.metrics["loss"]) < 1e-5
    _, every64, _, _ = oracle(m64, r64, batch, 0.1, 0.0, prompt=1)  # position 0 is never predicted
    assert_metrics(everything, every64, METRICS, rtol=1e-4, atol=1e-6)


def test_left_padding_gives_the_same_loss():
    model, ref = setup()
    batch = make_batch()
    res = L.dpo(model, batch, reference_model=ref)
    B = 3

    def left_pad(ids, attn, k=2):
        return torch.cat([torch.zeros(B, k, dtype=ids.dtype), ids], 1), torch.cat([torch.zeros(B, k, dtype=attn.dtype), attn], 1)

    ci, ca = left_pad(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    # chosen row 0 was right-padded; left padding is added in front of everything
    padded = dict(batch, chosen_input_ids=ci, chosen_attention_mask=ca)
    res2 = L.dpo(model, padded, reference_model=ref)
    assert_close(res2.loss.detach(), res.loss.detach(), rtol=1e-4, atol=1e-5, what="left padding")


def test_validation():
    model, ref = setup()
    batch = make_batch()
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo(model, batch, reference_model=ref, label_smoothing=0.9)
    with pytest.raises(ValueError, match="Did you mean 'beta'"):
        L.dpo(model, batch, reference_model=ref, betta=0.1)
    with pytest.raises(ValueError, match="beta"):
        L.dpo(model, batch, reference_model=ref, beta=0.0)
    with pytest.raises(ValueError, match=r"chosen_attention_mask.*\[B=3, Tc=8\].*\[3, 7\]"):
        L.dpo(model, dict(batch, chosen_attention_mask=batch["chosen_attention_mask"][:, :-1]), reference_model=ref)
    with pytest.raises(ValueError, match="missing required key 'rejected_input_ids'"):
        L.dpo(model, {k: v for k, v in batch.items() if k != "rejected_input_ids"}, reference_model=ref)
    with pytest.raises(ValueError, match="reference"):
        L.dpo(model, batch)
    with pytest.raises(TypeError, match="name"):
        L.dpo(model, batch, reference_model="some/model")


def test_non_finite_raises_before_backward():
    model, ref = setup()
    batch = make_batch()
    bad = dict(batch, ref_chosen_log_probs=torch.full((3,), float("nan")), ref_rejected_log_probs=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_chosen_log_probs"):  # the batch check names the key, before compute
        L.dpo(model, bad)
    assert all(p.grad is None for p in model.parameters())


def test_convergence_preferred_response_becomes_more_likely():
    torch.manual_seed(0)
    model = tiny_model()
    ref = frozen_copy(model)
    batch = make_batch(B=4, Tc=8, Tr=8)
    batch["chosen_attention_mask"] = torch.ones_like(batch["chosen_attention_mask"])
    loss_fn = L.DPOLoss(beta=0.5, reference_model=ref)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        opt.zero_grad()
        res = loss_fn(model, batch)
        first = first or res.metrics
        res.loss.backward()
        opt.step()
    assert res.metrics["loss"] < 0.5 * first["loss"]
    assert res.metrics["preference_accuracy"] == 1.0
    assert res.metrics["chosen_reward"] > first["chosen_reward"] and res.metrics["reward_margin"] > 1.0
    assert math.isfinite(res.metrics["implicit_reward"])


def test_float64_model_matches_formula_to_1e_12():
    model, ref = setup()
    batch = make_batch()
    m64, r64, o64 = double(model), double(ref), double(model)
    res = L.dpo(m64, batch, beta=0.5, label_smoothing=0.2, reference_model=r64)
    res.loss.backward()
    loss64, metrics64, _, _ = oracle(o64, r64, batch, 0.5, 0.2, prompt=3)
    loss64.backward()
    assert_float64_match(res, loss64, metrics64, METRICS, m64.named_parameters(), o64.parameters())
