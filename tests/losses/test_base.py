"""Registry, kwargs, batch specs, the stability monitor and the result type (no model needed)."""
import math

import pytest
import torch

import signalrl.losses as L
from signalrl.losses import registry
from signalrl.losses.base import Computed, Field, LossSpec, number, stability_warnings, to_floats

NAMES = ["causal_lm", "conservative_ppo", "dpo", "enhanced_ppo", "grpo", "importance_sampling", "reward_modeling"]


def test_registry_lists_the_seven_and_rejects_unknown_names():
    assert L.list_losses() == NAMES
    for n in NAMES:
        spec = L.get_loss(n)
        assert spec.name == n and getattr(L, n) is spec
    with pytest.raises(ValueError) as e:
        L.get_loss("ppo")
    for n in NAMES:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="Did you mean 'dpo'"):
        L.get_loss("dpoo")


def test_spec_flags():
    assert L.get_loss("enhanced_ppo").needs_value_head
    assert L.get_loss("reward_modeling").needs_reward_head
    assert not L.get_loss("dpo").needs_value_head
    for n in ("enhanced_ppo", "conservative_ppo", "dpo", "grpo", "importance_sampling"):
        assert L.get_loss(n).uses_reference
    for n in ("causal_lm", "reward_modeling"):
        assert not L.get_loss(n).uses_reference
    assert "clip_epsilon" in L.get_loss("enhanced_ppo").describe()


def test_documented_defaults():
    ppo = L.get_loss("enhanced_ppo").resolve_kwargs({})
    assert {k: ppo[k] for k in ("use_gae", "gamma", "gae_lambda", "clip_epsilon", "value_loss_coef", "entropy_coef",
                                "beta", "clip_value_loss", "reference_model", "normalize_advantages",
                                "kl_estimator", "loss_aggregation")} == dict(
        use_gae=True, gamma=0.99, gae_lambda=0.95, clip_epsilon=0.2, value_loss_coef=0.5, entropy_coef=0.01,
        beta=0.01, clip_value_loss=True, reference_model=None, normalize_advantages=True, kl_estimator="k3",
        loss_aggregation="token-mean")
    assert L.get_loss("dpo").resolve_kwargs({}) == dict(beta=0.1, reference_model=None, label_smoothing=0.0)
    g = L.get_loss("grpo").resolve_kwargs({})
    assert (g["beta"], g["clip_epsilon"], g["scale_rewards"], g["kl_estimator"]) == (0.01, 0.2, True, "k3")
    i = L.get_loss("importance_sampling").resolve_kwargs({})
    assert (i["beta"], i["clip_ratio"], i["reference_model"]) == (0.1, 10.0, None)
    c = L.get_loss("conservative_ppo").resolve_kwargs({})
    assert (c["conservative_coef"], c["max_kl_divergence"], c["clip_epsilon"]) == (0.1, 0.01, 0.2)
    assert L.get_loss("reward_modeling").resolve_kwargs({}) == dict(margin=1.0, temperature=0.1)


def test_unknown_and_bad_kwargs():
    spec = L.get_loss("enhanced_ppo")
    with pytest.raises(ValueError) as e:
        spec.resolve_kwargs({"clip_eps": 0.1})
    msg = str(e.value)
    assert "Did you mean 'clip_epsilon'" in msg and "gae_lambda=0.95" in msg  # lists the accepted ones
    with pytest.raises(ValueError, match="use_gae must be True or False"):
        spec.resolve_kwargs({"use_gae": "yes"})
    with pytest.raises(ValueError, match="beta must be a finite number"):
        spec.resolve_kwargs({"beta": float("nan")})
    with pytest.raises(ValueError, match="beta"):
        spec.resolve_kwargs({"beta": True})
    with pytest.raises(ValueError, match="clip_epsilon"):
        spec.resolve_kwargs({"clip_epsilon": 0.0})
    assert spec.resolve_kwargs({"gamma": 1})["gamma"] == 1.0 and isinstance(spec.resolve_kwargs({"gamma": 1})["gamma"], float)
    assert spec.resolve_kwargs({"reference_model": "name/of-model"})["reference_model"] == "name/of-model"
    with pytest.raises(ValueError, match="reference_model"):
        spec.resolve_kwargs({"reference_model": 3})
    with pytest.raises(ValueError, match="clip_epsilon"):  # the module form checks at construction
        L.EnhancedPPOLoss(clip_eps=0.1)


def test_batch_validation_messages():
    spec = L.get_loss("enhanced_ppo")
    ok = dict(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5),
              old_log_probs=torch.zeros(2, 5), rewards=torch.zeros(2, 5))
    assert set(spec.validate_batch(ok)) == set(ok)
    with pytest.raises(ValueError, match=r"batch\['rewards'\]: expected shape \[B=2, T=5\], received \[2, 4\]"):
        spec.validate_batch(dict(ok, rewards=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match=r"expected shape \[B=2, T=5\], received \[5\]"):
        spec.validate_batch(dict(ok, old_log_probs=torch.zeros(5)))
    with pytest.raises(TypeError, match=r"input_ids.*integer.*torch.float32"):
        spec.validate_batch(dict(ok, input_ids=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="missing required key 'old_log_probs'"):
        spec.validate_batch({k: v for k, v in ok.items() if k != "old_log_probs"})
    with pytest.raises(ValueError, match="on meta"):
        spec.validate_batch(dict(ok, rewards=torch.zeros(2, 5, device="meta")))
    with pytest.raises(TypeError, match="dict"):
        spec.validate_batch([1, 2])
    lists = spec.validate_batch(dict(ok, input_ids=[[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]))
    assert lists["input_ids"].dtype == torch.long
    assert spec.validate_batch(dict(ok, values=None)).keys() == ok.keys()  # None = absent


def test_stability_monitor_thresholds():
    assert stability_warnings({"kl_divergence": 0.05, "clip_fraction": 0.2, "explained_variance": 0.5}) == []
    w = stability_warnings({"kl_divergence": 0.06})
    assert len(w) == 1 and "KL" in w[0]
    assert len(stability_warnings({"clip_fraction": 0.05})) == 1
    assert len(stability_warnings({"clip_fraction": 0.31})) == 1
    assert len(stability_warnings({"explained_variance": 0.49})) == 1
    w = stability_warnings({"entropy": float("nan"), "loss": 1.0})
    assert len(w) == 1 and "entropy" in w[0]
    assert stability_warnings({"clip_fraction": 0.0}, skip=frozenset({"clip_fraction"})) == []


def test_result_and_metrics_are_python_floats_and_loss_is_always_a_metric():
    def compute(policy, batch, kw):
        x = batch["x"] * kw["scale"]
        return Computed(loss=x.sum(), metrics={"m": x.mean().detach(), "k": 2, "_hidden": torch.tensor(1.0)})

    spec = LossSpec(name="toy", batch=(Field("x", ("N",), "float"),), defaults={"scale": 1.0},
                    checks={"scale": number()}, compute=compute)
    x = torch.ones(3, requires_grad=True)
    res = spec(torch.nn.Linear(1, 1), {"x": x}, scale=2.0)
    loss, metrics = res  # unpacks as (loss, metrics)
    assert metrics == {"m": 2.0, "k": 2.0, "loss": 6.0} and all(type(v) is float for v in metrics.values())
    loss.backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match=r"toy: batch\['x'\]: expected finite"):  # checked before compute
        spec(torch.nn.Linear(1, 1), {"x": torch.tensor([1.0, float("inf")])})
    with pytest.raises(L.NonFiniteLossError, match="toy"):  # finite inputs whose loss overflows
        spec(torch.nn.Linear(1, 1), {"x": torch.tensor([1.0, 3e38])}, scale=2.0)
    assert to_floats({"a": torch.tensor(1.5), "b": 3}) == {"a": 1.5, "b": 3.0}
    assert math.isnan(to_floats({"a": torch.tensor(float("nan"))})["a"])


def test_register_custom_loss():
    spec = LossSpec(name="toy_registered", batch=(Field("x", ("N",), "float"),), defaults={},
                    compute=lambda p, b, kw: Computed(loss=b["x"].sum(), metrics={}))
    assert L.register_loss(spec) is spec
    try:
        assert L.get_loss("toy_registered") is spec
        with pytest.raises(ValueError, match="already registered"):
            L.register_loss(LossSpec(name="toy_registered", batch=(), defaults={}, compute=spec.compute))
    finally:
        registry._REGISTRY.pop("toy_registered")
    assert "toy_registered" not in L.list_losses()
    with pytest.raises(TypeError):
        L.register_loss("not a spec")
