"""The reference-model LRU cache: frozen models, shared, least recently used dropped."""
import pytest
import torch

from signalrl.engine.models import load_base_model
from signalrl.engine.engine import default_device
from signalrl.engine.frozen_models import ReferenceCache


def test_lru_eviction_and_sharing():
    loads = []

    def loader(name, **kw):
        loads.append(name)
        return torch.nn.Linear(2, 2)

    cache = ReferenceCache(loader, capacity=2)
    a = cache.get("a", dtype="float32", device="cpu")
    assert cache.get("a", dtype="float32", device="cpu") is a  # shared, not reloaded
    b = cache.get("b", dtype="float32", device="cpu")
    cache.get("a", dtype="float32", device="cpu")  # a is now most recent
    cache.get("c", dtype="float32", device="cpu")  # evicts b
    assert [k[0] for k in cache.keys()] == ["a", "c"]
    assert cache.get("b", dtype="float32", device="cpu") is not b
    assert loads == ["a", "b", "c", "b"]
    assert (cache.hits, cache.misses) == (2, 4)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        ReferenceCache(lambda *a, **k: None, capacity=0)


def test_builtin_reference_equals_fresh_base_with_same_seed():
    cache = ReferenceCache(lambda name, **kw: load_base_model(name, **kw)[0], capacity=1)
    ref = cache.get("signal-tiny", dtype="float32", device="cpu", seed=3)
    base, _ = load_base_model("signal-tiny", seed=3)
    other, _ = load_base_model("signal-tiny", seed=4)
    ref_sd, base_sd = ref.state_dict(), base.state_dict()
    assert all(torch.equal(ref_sd[k], base_sd[k]) for k in base_sd)
    assert not torch.equal(other.state_dict()["lm_head.weight"], base_sd["lm_head.weight"])


def test_load_base_model_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="base_model: could not load"):
        load_base_model(str(tmp_path / "nothing-here"))


def test_runs_share_named_reference_models(engine, make_run):
    pairs = [{"prompt": "q", "chosen": "ab", "rejected": "cd"}]
    a, b = make_run(lora_r=4), make_run(lora_r=0)
    hits, misses = engine.reference_cache.hits, engine.reference_cache.misses
    ra = a.forward(pairs, "dpo", {"reference_model": "signal-tiny-4l"})
    rb = b.forward(pairs, "dpo", {"reference_model": "signal-tiny-4l"})
    assert engine.reference_cache.misses == misses + 1 and engine.reference_cache.hits == hits + 1
    assert ra.loss > 0 and rb.loss > 0
    # Full fine-tuning with no reference named: the run's own base model (== its initial weights), so
    # before any update the policy equals the reference and the implicit rewards are 0.
    r0 = b.forward(pairs, "dpo")
    assert r0.metrics["chosen_reward"] == 0.0 and r0.metrics["rejected_reward"] == 0.0
    assert ("signal-tiny", "torch.float32", default_device(), 0) in engine.reference_cache.keys()
