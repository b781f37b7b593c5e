"""PolicyModel: alignment, the fused path (no full logits), the fallback, heads, references, LoRA."""
import copy
import warnings

import peft
import pytest
import torch
import transformers

import signalrl.losses as L

from ._helpers import H, V, assert_close, double, f64_hidden, f64_token_logprobs, shifted_mask, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5


def batch(B=3, T=8):
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0
    attn[2, -2:] = 0
    return ids, attn


def test_token_logprobs_alignment_and_entropy_match_float64():
    model = tiny_model()
    ids, attn = batch()
    lp, ent = L.PolicyModel(model).token_logprobs(ids, attn, with_entropy=True, temperature=0.7)
    lp64, ent64 = f64_token_logprobs(double(model), ids, attn, temperature=0.7)
    m = shifted_mask(attn)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    assert (lp[:, 0] == 0).all() and (lp[m == 0] == 0).all()
    assert_close(lp * m, lp64 * m, rtol=1e-4, atol=1e-5, what="logprobs")
    assert_close(ent * m, ent64 * m, rtol=1e-4, atol=1e-5, what="entropy")


def test_fused_path_never_asks_for_full_logits(monkeypatch):
    model = tiny_model()
    ids, attn = batch()

    def boom(*a, **k):
        raise AssertionError("full logits were computed")

    monkeypatch.setattr(model.lm_head, "forward", boom)
    monkeypatch.setattr(model, "forward", boom)
    policy = L.PolicyModel(model)
    lp = policy.token_logprobs(ids, attn)
    assert policy.hidden_states(ids, attn).shape == (3, 8, H)
    w, b = policy.lm_head()
    assert w is model.lm_head.weight and b is None
    L.causal_lm(policy, dict(input_ids=ids, attention_mask=attn)).loss.backward()
    assert model.lm_head.weight.grad is not None and lp.shape == ids.shape


def test_fallback_for_soft_capping_warns_once_and_is_correct():
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                    final_logit_softcapping=2.0)
    model = transformers.Gemma2ForCausalLM(cfg)
    ids = torch.randint(0, V, (2, 6))
    attn = torch.ones_like(ids)
    policy = L.PolicyModel(model)
    with pytest.warns(L.FusedPathWarning, match="final_logit_softcapping"):
        lp = policy.token_logprobs(ids, attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.FusedPathWarning)
        policy.token_logprobs(ids, attn)  # one-time: no second warning
        L.PolicyModel(model).token_logprobs(ids, attn)  # not even from a new wrapper of the same model
    logits = model(input_ids=ids, attention_mask=attn).logits.double()  # soft-capped by the model
    truth = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert_close(lp[:, 1:], truth, rtol=1e-4, atol=1e-5, what="fallback logprobs")


def test_values_and_sequence_rewards():
    model = tiny_model()
    vh, rh = L.ValueHead(H), L.RewardHead(H)
    policy = L.PolicyModel(model, value_head=vh, reward_head=rh)
    ids, attn = batch()
    values = policy.values(ids, attn)
    hid = f64_hidden(double(model), ids, attn)
    w, b = vh.linear.weight.double()[0], vh.linear.bias.double()[0]
    expected = torch.cat([torch.zeros(3, 1, dtype=torch.float64), hid[:, :-1] @ w + b], 1)  # V(input_ids[<t])
    assert values.shape == ids.shape and (values[:, 0] == 0).all()
    assert_close(values, expected, rtol=1e-4, atol=1e-5, what="values")
    r = policy.sequence_rewards(ids, attn)
    last = [7, 7, 5]
    w, b = rh.linear.weight.double()[0], rh.linear.bias.double()[0]
    assert_close(r, torch.stack([hid[i, t] @ w + b for i, t in enumerate(last)]), rtol=1e-4, atol=1e-5, what="rewards")
    names = {n for n, _ in policy.named_parameters()}
    assert "value_head.linear.weight" in names and "reward_head.linear.weight" in names


def test_missing_heads_and_reference_explain_themselves():
    policy = L.PolicyModel(tiny_model())
    ids, attn = batch()
    with pytest.raises(ValueError, match="value head"):
        policy.values(ids, attn)
    with pytest.raises(ValueError, match="reward head"):
        policy.sequence_rewards(ids, attn)
    with pytest.raises(ValueError, match="reference_model"):
        policy.reference_logprobs(ids, attn)


def test_separate_reference_is_not_trained_and_not_a_parameter():
    model, ref = tiny_model(), tiny_model()
    policy = L.PolicyModel(model, reference_model=ref)
    ids, attn = batch()
    ref_lp = policy.reference_logprobs(ids, attn)
    assert not ref_lp.requires_grad
    assert_close(ref_lp, L.PolicyModel(ref).token_logprobs(ids, attn).detach(), rtol=1e-6, atol=1e-7, what="ref")
    assert {id(p) for p in policy.parameters()} == {id(p) for p in model.parameters()}


def lora_model():
    base = tiny_model()
    original = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # make the adapters matter
    return model, original


def test_lora_reference_is_the_model_with_adapters_disabled():
    model, original = lora_model()
    policy = L.PolicyModel(model)
    ids, attn = batch()
    ref_lp = policy.reference_logprobs(ids, attn)
    base_lp = L.PolicyModel(original).token_logprobs(ids, attn)
    pol_lp = policy.token_logprobs(ids, attn)
    assert_close(ref_lp, base_lp.detach(), rtol=1e-5, atol=1e-6, what="reference = base without adapters")
    assert (pol_lp - ref_lp).abs().max() > 1e-3  # the adapters change the policy
    assert_close(policy.token_logprobs(ids, attn), pol_lp, rtol=0, atol=0, what="adapters are back on")


def test_lora_gradients_reach_only_the_adapters():
    model, _ = lora_model()
    chosen, ca = batch()
    rejected, ra = batch()
    res = L.dpo(model, dict(chosen_input_ids=chosen, chosen_attention_mask=ca, rejected_input_ids=rejected,
                            rejected_attention_mask=ra))
    assert res.metrics["chosen_reward"] != 0.0  # the reference (adapters off) differs from the policy
    res.loss.backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n


def test_lora_on_the_lm_head_falls_back_to_logits():
    base = tiny_model()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    policy = L.PolicyModel(model)
    assert "LM head" in policy.fused_unsupported_reason()
    ids, attn = batch()
    with pytest.warns(L.FusedPathWarning):
        lp = policy.token_logprobs(ids, attn)
    truth = torch.log_softmax(model(input_ids=ids, attention_mask=attn,
                                    position_ids=(attn.cumsum(-1) - 1).clamp_min(0)).logits.double(), -1)
    truth = truth[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * shifted_mask(attn)[:, 1:]
    assert_close(lp[:, 1:], truth, rtol=1e-4, atol=1e-5, what="LoRA lm_head fallback")
