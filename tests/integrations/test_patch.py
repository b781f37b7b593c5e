"""signalrl.patch(model): the stock loss and gradients of every architecture, without [B, T, V] logits."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import signalrl
from signalrl.integrations import is_patched, patch, unpatch
from signalrl.losses import FusedPathWarning

from ._models import ARCHS, padded_batch, tiny_model

pytest.importorskip("peft")


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_grads_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        scale = g.abs().max().item()
        assert err <= rtol * scale + 1e-9, f"{name}: max |Δgrad| {err:.3g} vs max |grad| {scale:.3g}"


def _head_outputs(model):
    """Shapes of everything the output layer returns while the hook is on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes = []
    handle = base.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    return shapes, handle


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_loss_and_grads_equal_stock(arch, lora):
    model = tiny_model(arch, lora=lora)
    ids, attn, labels = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=attn, labels=labels)
    stock, g_stock = _loss_and_grads(model, **inputs)
    assert stock.logits is not None

    if arch == "gemma2":  # soft-capping: one clear warning, then the stock path
        with pytest.warns(FusedPathWarning, match="final_logit_softcapping"):
            patch(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            out, g = _loss_and_grads(model, **inputs)
        assert out.logits is not None and not is_patched(model)
    else:
        patch(model)
        assert is_patched(model)
        shapes, handle = _head_outputs(model)
        out, g = _loss_and_grads(model, **inputs)
        handle.remove()
        assert out.logits is None
        assert all(s[-1] == 1 for s in shapes), f"the head produced logits: {shapes}"  # never [B, T, V]
    assert out.loss.dtype == stock.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-5, atol=0)
    _assert_grads_close(g, g_stock)
    unpatch(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_kwargs_follow_for_causal_lm_loss(arch):
    """num_items_in_batch, shift_labels, logits_to_keep, ignore_index, return_dict=False, return_logits."""
    model = tiny_model(arch)
    ids, attn, labels = padded_batch()
    base = dict(input_ids=ids, attention_mask=attn)
    n = torch.tensor(17)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    k = 4
    cases = [
        dict(labels=labels, num_items_in_batch=n),
        dict(labels=labels, num_items_in_batch=23),
        dict(labels=labels, shift_labels=shift),
        dict(labels=labels[:, -k:].contiguous(), logits_to_keep=k),
        dict(labels=labels, return_dict=False),
    ]
    stock = [model(**base, **c) for c in cases]
    patch(model)
    for c, s in zip(cases, stock):
        out = model(**base, **c)
        if c.get("return_dict") is False:
            assert isinstance(out, tuple) and isinstance(s, tuple)
            torch.testing.assert_close(out[0], s[0], rtol=1e-5, atol=0)
            assert len(out) == len(s) - 1  # no logits
        else:
            torch.testing.assert_close(out.loss, s.loss, rtol=1e-5, atol=0)
            assert out.logits is None
    with_logits = model(**base, labels=labels, return_logits=True)
    torch.testing.assert_close(with_logits.logits, stock[0].logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_logits.loss, model(**base, labels=labels).loss)
    patch(model, return_logits=True)
    assert model(**base, labels=labels).logits is not None
    # all labels ignored: NaN, as the stock mean over zero tokens
    assert torch.isnan(model(**base, labels=torch.full_like(labels, -100)).loss)
    # without labels: the stock forward (logits, no loss)
    plain = model(**base)
    assert plain.loss is None and plain.logits.shape == (*ids.shape, model.config.vocab_size)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**base, labels=labels, logits_to_keep=k)  # labels wider than the kept positions


def test_patch_is_idempotent_reversible_and_per_instance():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    cls_forward = type(model).forward
    sig = inspect.signature(model.forward)
    assert "forward" not in model.__dict__
    assert signalrl.patch(model) is model
    first = model.__dict__["forward"]
    patch(model)
    assert model.__dict__["forward"] is first  # no second layer
    assert inspect.signature(model.forward) == sig  # generate / Trainer read the original signature
    ids, attn, labels = padded_batch()
    assert model(input_ids=ids, attention_mask=attn, labels=labels).logits is None
    # a second model of the same class is untouched
    assert "forward" not in other.__dict__ and type(other).forward is cls_forward
    assert other(input_ids=ids, attention_mask=attn, labels=labels).logits is not None
    # a deep copy is patched and computes with its own weights
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    a = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    b = twin(input_ids=ids, attention_mask=attn, labels=labels).loss
    assert is_patched(twin) and not torch.equal(a, b)
    # generation goes through the stock path
    gen = model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 6)
    assert signalrl.unpatch(model) is model
    assert "forward" not in model.__dict__ and not is_patched(model)
    assert model.forward.__func__ is cls_forward
    unpatch(model)  # a no-op
    assert model(input_ids=ids, attention_mask=attn, labels=labels).logits is not None


def test_peft_patch_targets_the_base_model_and_survives_wrapping_after():
    model = tiny_model("qwen2")
    patch(model)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, attn, labels = padded_batch()
    assert is_patched(peft_model)
    assert peft_model(input_ids=ids, attention_mask=attn, labels=labels).logits is None
    unpatch(peft_model)
    assert not is_patched(model)
    assert peft_model(input_ids=ids, attention_mask=attn, labels=labels).logits is not None


def test_lora_on_the_head_falls_back_with_one_warning():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.warns(FusedPathWarning, match="not a plain nn.Linear"):
        patch(model)
    ids, attn, labels = padded_batch()
    assert model(input_ids=ids, attention_mask=attn, labels=labels).logits is not None


def test_unpatch_under_a_later_wrapper_becomes_a_pass_through():
    model = tiny_model("llama")
    patch(model)
    inner = model.forward

    def outer(*a, **k):
        return inner(*a, **k)

    model.forward = outer
    with pytest.warns(RuntimeWarning, match="wrapped again"):
        unpatch(model)
    ids, attn, labels = padded_batch()
    assert model(input_ids=ids, attention_mask=attn, labels=labels).logits is not None  # stock again
    assert model.forward is outer


def test_a_forward_that_changes_the_logits_after_the_head_falls_back():
    """Checked at run time, once per model: a scaling no config field announces still gives the stock loss."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ._models import tiny_config

    class HalfLogits(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits * 0.5
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    torch.manual_seed(0)
    model = HalfLogits(tiny_config("llama")).eval()
    ids, attn, labels = padded_batch()
    want = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    patch(model)
    with pytest.warns(FusedPathWarning, match="changes the logits"):
        got = model(input_ids=ids, attention_mask=attn, labels=labels)
    torch.testing.assert_close(got.loss, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(input_ids=ids, attention_mask=attn, labels=labels).loss, want)
    # and a multiplier the config announces is caught before any call
    other = tiny_model("llama")
    other.config.lm_head_multiplier = 2.0
    with pytest.warns(FusedPathWarning, match="lm_head_multiplier"):
        patch(other)
    assert not is_patched(other)


def test_moe_aux_loss_is_added_as_stock():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.3, output_router_logits=True)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids, attn, labels = padded_batch()
    stock, g_stock = _loss_and_grads(model, input_ids=ids, attention_mask=attn, labels=labels)
    assert stock.aux_loss is not None
    patch(model)
    out, g = _loss_and_grads(model, input_ids=ids, attention_mask=attn, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.aux_loss, stock.aux_loss)
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-5, atol=0)
    _assert_grads_close(g, g_stock)
