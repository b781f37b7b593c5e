"""Property test over the training API: a valid batch mutated at random (token ids, mask values, dtypes, shapes,
missing and unknown keys, NaN / inf / huge values, bad kwargs) either trains — and then its loss equals the
float64-checked reference backend's — or raises a ValueError/TypeError that names an argument, leaving the run
bit-for-bit as it was. ``SIGNAL_FUZZ_EXAMPLES`` sets the number of cases (default 40; the note of issue 11 ran
2000); the outcome counts are printed at the end of the module (``pytest -s``)."""
import collections
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signalrl import ops

from _run_state import assert_same, snapshot

EXAMPLES = int(os.environ.get("SIGNAL_FUZZ_EXAMPLES", "40"))
OUTCOMES: collections.Counter = collections.Counter()
V = 260
BAD_FLOATS = [math.nan, math.inf, -math.inf, 1e30, -1e30, 5.0, -0.5]
KWARGS = {
    "causal_lm": ["temperature", "label_smoothing", "ignore_index"],
    "enhanced_ppo": ["clip_epsilon", "beta", "gamma", "gae_lambda", "value_loss_coef", "entropy_coef",
                     "loss_aggregation"],
}


@pytest.fixture(scope="module")
def run(make_run):
    r = make_run(lora_r=4, learning_rate=1e-3, value_head=True)
    yield r
    print(f"\nfuzz outcomes over {sum(OUTCOMES.values())} cases: {dict(OUTCOMES)}")


def _valid(loss_fn, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):  # right padding of random length, at least one real token
        mask[b, int(torch.randint(1, T + 1, (1,), generator=g)):] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if loss_fn == "enhanced_ppo":
        batch["old_log_probs"] = -torch.rand(B, T, generator=g) * 3
        batch["rewards"] = torch.randn(B, T, generator=g)
    return batch


@st.composite
def cases(draw):
    loss_fn = draw(st.sampled_from(sorted(KWARGS)))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    batch = _valid(loss_fn, B, T, draw(st.integers(0, 2**31)))
    kwargs = {}
    for _ in range(draw(st.integers(0, 3))):
        if not batch:
            break
        key = draw(st.sampled_from([k for k, v in batch.items() if isinstance(v, torch.Tensor)] or [None]))
        if key is None:
            break
        t = batch[key]
        kind = draw(st.sampled_from(["value", "dtype", "shape", "drop", "unknown_key", "kwarg", "list"]))
        idx = tuple(draw(st.integers(0, n - 1)) for n in t.shape)
        if kind == "value" and t.is_floating_point():
            t = t.clone()
            t[idx] = draw(st.sampled_from(BAD_FLOATS))
        elif kind == "value":
            t = t.clone()
            t[idx] = draw(st.sampled_from([-1, 2, V, V + 1000, -100, 0, 1]))
        elif kind == "dtype":
            t = t.to(draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float64, torch.int32])))
        elif kind == "shape":
            t = torch.cat([t, t[-1:]]) if draw(st.booleans()) else torch.cat([t, t[:, -1:]], dim=1)
        elif kind == "drop":
            t = None
        elif kind == "unknown_key":
            batch[draw(st.sampled_from(["input_id", "mask", "advantages", "labelz"]))] = t.clone()
        elif kind == "kwarg":
            name = draw(st.sampled_from(KWARGS[loss_fn] + ["clip_eps", "nonsense"]))
            kwargs[name] = draw(st.sampled_from([0.2, -1.0, 0.0, 2.0, math.nan, math.inf, "x", None, True, 7]))
        elif kind == "list":
            t = t.tolist()
        if t is None:
            batch.pop(key)
        elif kind in ("value", "dtype", "shape", "list"):
            batch[key] = t
    return loss_fn, batch, kwargs


def _names(batch, kwargs):
    return set(batch) | set(kwargs) | {"batch_data", "loss_fn", "loss_kwargs", "input_ids", "attention_mask",
                                       "old_log_probs", "rewards"}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_forward_backward_gives_the_reference_result_or_a_named_error(run, case):
    loss_fn, batch, kwargs = case
    before = snapshot(run)
    try:
        result = run.forward_backward(batch, loss_fn, kwargs)
    except (ValueError, TypeError) as exc:
        OUTCOMES[f"named {type(exc).__name__}"] += 1
        msg = str(exc)
        assert any(n in msg for n in _names(batch, kwargs)), msg
        assert_same(before, snapshot(run))
        return
    except Exception as exc:  # noqa: BLE001 - anything else is the bug this test looks for
        OUTCOMES[f"other {type(exc).__name__}"] += 1
        assert_same(before, snapshot(run))
        raise AssertionError(f"{type(exc).__name__} is neither a result nor a named error: {exc}") from exc
    OUTCOMES["result"] += 1
    assert math.isfinite(result.loss)
    with ops.use_backend("reference"):
        again = run.forward(batch, loss_fn, kwargs)
    assert again.loss == pytest.approx(result.loss, rel=1e-4, abs=1e-5)
    run.optimizer.zero_grad(set_to_none=True)  # keep the next case's state small and comparable
    run.pending_grads = 0
