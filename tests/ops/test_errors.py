"""Issue 11 at the op level: every bad input gives the same exception class and the same message on every backend
available here (validation runs before the backend is chosen, see docs/backends.md "Bad inputs"), and the inputs
that are not errors (empty batches, non-finite logits, unchecked values on CUDA) give the same defined result on
every backend."""
import math

import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import _validate, available_backends, use_backend

from ._oracle import KERNELS, rel_err

MASK_EXPECTED = "finite values ≥ 0 (0 = not counted, > 0 = counted with that weight)"
FLOATS = "float32, bfloat16, float16, float64"
AGGS = "('token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean', 'seq-mean-token-sum-norm')"


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _tgt(values):
    return torch.tensor(values, dtype=torch.long)


def _with(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def _logits():
    return _t(2, 3, 10)


def _m(shape=(2, 3)):
    return torch.ones(shape)


def _ppo_args(**kw):
    """linear_ppo_loss positional args for hidden [2, 3, 8], V = 10."""
    args = [_t(2, 3, 8), _t(10, 8), torch.zeros(2, 3, dtype=torch.long), _t(2, 3), _t(2, 3)]
    return args, kw


# (id, op, builder -> (args, kwargs), exception class, exact message)
CASES = [
    # --- token_logprobs
    ("tok-target-too-big", "token_logprobs",
     lambda: ([_logits(), _with(torch.zeros(2, 3, dtype=torch.long), (0, 2), 11)], {}),
     ValueError, "targets: expected class indices in [0, 10) or ignore_index=-100, got 11 at index (0, 2)"),
    ("tok-target-negative", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, -3, 2, -100])], {}),
     ValueError, "targets: expected class indices in [0, 10) or ignore_index=-100, got -3 at index 1"),
    ("tok-target-is-the-default-ignore", "token_logprobs", lambda: ([_t(4, 10), _tgt([-100, 3, 2, -1])],
                                                                     dict(ignore_index=-1)),
     ValueError, "targets: expected class indices in [0, 10) or ignore_index=-1, got -100 at index 0"),
    ("tok-ignore-index-float", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])], dict(ignore_index=5.5)),
     TypeError, "ignore_index: expected an int, got float 5.5"),
    ("tok-ignore-index-bool", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])], dict(ignore_index=True)),
     TypeError, "ignore_index: expected an int, got bool True"),
    ("tok-ignore-index-huge", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])], dict(ignore_index=2**63)),
     ValueError, "ignore_index: expected an int64 value, got 9223372036854775808"),
    ("tok-return-entropy-str", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])],
                                                           dict(return_entropy="yes")),
     TypeError, "return_entropy: expected a bool, got str 'yes'"),
    ("tok-inplace-int", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])], dict(inplace_backward=1)),
     TypeError, "inplace_backward: expected a bool, got int 1"),
    ("tok-V0", "token_logprobs", lambda: ([torch.zeros(3, 0), _tgt([0, 0, 0])], {}),
     ValueError, "logits: expected a non-empty vocabulary dimension, got shape (3, 0)"),
    ("tok-temperature-inf", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])], dict(temperature=math.inf)),
     ValueError, "temperature: expected a positive number, got inf"),
    ("tok-temperature-nan", "token_logprobs", lambda: ([_t(4, 10), _tgt([1, 5, 2, 3])], dict(temperature=math.nan)),
     ValueError, "temperature: expected a positive number, got nan"),
    ("tok-logits-int", "token_logprobs", lambda: ([torch.zeros(4, 10, dtype=torch.long), _tgt([1, 5, 2, 3])], {}),
     TypeError, f"logits: expected dtype in ({FLOATS}), got int64"),
    ("tok-targets-float", "token_logprobs", lambda: ([_t(4, 10), torch.zeros(4)], {}),
     TypeError, "targets: expected dtype in (int64, int32), got float32"),
    ("tok-logits-0d", "token_logprobs", lambda: ([torch.tensor(1.0), _tgt(0)], {}),
     ValueError, "logits: expected at least 1 dimension(s), got shape ()"),
    # --- linear_token_logprobs
    ("lin-target-too-big", "linear_token_logprobs", lambda: ([_t(4, 8), _t(10, 8), _tgt([1, 10, 2, -100])], {}),
     ValueError, "targets: expected class indices in [0, 10) or ignore_index=-100, got 10 at index 1"),
    ("lin-H0", "linear_token_logprobs", lambda: ([torch.zeros(4, 0), torch.zeros(10, 0), _tgt([1, 1, 2, 3])], {}),
     ValueError, "hidden: expected a non-empty feature dimension (H = hidden.shape[-1] ≥ 1), got shape (4, 0)"),
    ("lin-V0", "linear_token_logprobs", lambda: ([_t(4, 8), torch.zeros(0, 8), _tgt([0, 0, 0, 0])], {}),
     ValueError, "weight: expected at least one row (V = weight.shape[0] ≥ 1), got shape (0, 8)"),
    ("lin-bias-dtype", "linear_token_logprobs", lambda: ([_t(4, 8), _t(10, 8), _tgt([1, 1, 2, 3])],
                                                         dict(bias=_t(10, dtype=torch.float64))),
     TypeError, "bias: expected dtype torch.float32 (the dtype of hidden), got torch.float64"),
    ("lin-ignore-index-float", "linear_token_logprobs", lambda: ([_t(4, 8), _t(10, 8), _tgt([1, 1, 2, 3])],
                                                                 dict(ignore_index=-100.0)),
     TypeError, "ignore_index: expected an int, got float -100.0"),
    ("lin-return-entropy-none", "linear_token_logprobs", lambda: ([_t(4, 8), _t(10, 8), _tgt([1, 1, 2, 3])],
                                                                  dict(return_entropy=None)),
     TypeError, "return_entropy: expected a bool, got NoneType None"),
    # --- clipped_surrogate
    ("surr-mask-negative", "clipped_surrogate",
     lambda: ([_t(2, 3), _t(2, 3), _t(2, 3), _with(_m(), (1, 0), -1.0)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got -1.0 at index (1, 0)"),
    ("surr-mask-nan", "clipped_surrogate",
     lambda: ([_t(2, 3), _t(2, 3), _t(2, 3), _with(_m(), (0, 2), math.nan)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got nan at index (0, 2)"),
    ("surr-mask-inf", "clipped_surrogate", lambda: ([_t(6), _t(6), _t(6), _with(_m((6,)), 4, math.inf)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got inf at index 4"),
    ("surr-mask-int-negative", "clipped_surrogate",
     lambda: ([_t(2, 3), _t(2, 3), _t(2, 3), _with(torch.ones(2, 3, dtype=torch.long), (0, 1), -1)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got -1 at index (0, 1)"),
    ("surr-mask-int8", "clipped_surrogate",
     lambda: ([_t(2, 3), _t(2, 3), _t(2, 3), torch.ones(2, 3, dtype=torch.int8)], {}),
     TypeError, "mask: expected dtype in (bool, float32, bfloat16, float16, float64, int64, int32, uint8), got int8"),
    ("surr-clip-low-str", "clipped_surrogate", lambda: ([_t(2, 3), _t(2, 3), _t(2, 3)], dict(clip_low="0.2")),
     ValueError, "clip_low: expected a number in [0.0, 1.0], got '0.2'"),
    ("surr-aggregation-int", "clipped_surrogate", lambda: ([_t(2, 3), _t(2, 3), _t(2, 3)], dict(aggregation=5)),
     ValueError, f"aggregation: expected one of {AGGS}, got 5"),
    ("surr-log-ratio-clamp-bool", "clipped_surrogate", lambda: ([_t(2, 3), _t(2, 3), _t(2, 3)],
                                                                dict(log_ratio_clamp=True)),
     ValueError, "log_ratio_clamp: expected None or a positive number, got True"),
    ("surr-logprobs-int", "clipped_surrogate",
     lambda: ([torch.zeros(2, 3, dtype=torch.long), _t(2, 3), _t(2, 3)], {}),
     TypeError, f"logprobs: expected dtype in ({FLOATS}), got int64"),
    ("surr-logprobs-0d", "clipped_surrogate",
     lambda: ([torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)], {}),
     ValueError, "logprobs: expected at least 1 dimension(s), got shape ()"),
    # --- value_loss
    ("value-mask-negative", "value_loss", lambda: ([_t(2, 3), _t(2, 3), _t(2, 3), _with(_m(), (0, 0), -0.5)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got -0.5 at index (0, 0)"),
    # the native kernel checks a float32 mask in its own pass: a bad value past its first chunks is found and named
    ("value-mask-nan-late", "value_loss",
     lambda: ([_t(3, 5000), _t(3, 5000), _t(3, 5000), _with(_m((3, 5000)), (2, 4321), math.nan)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got nan at index (2, 4321)"),
    ("value-mask-inf-weighted", "value_loss",
     lambda: ([_t(9), _t(9), _t(9), _with(_m((9,)), 8, -math.inf)], dict(aggregation="seq-mean-token-sum")),
     ValueError, f"mask: expected {MASK_EXPECTED}, got -inf at index 8"),
    ("value-clip-inf", "value_loss", lambda: ([_t(2, 3), _t(2, 3), _t(2, 3)], dict(clip=math.inf)),
     ValueError, "clip: expected a positive number, got inf"),
    ("value-returns-bool", "value_loss", lambda: ([_t(2, 3), _t(2, 3), torch.ones(2, 3, dtype=torch.bool)], {}),
     TypeError, f"returns: expected dtype in ({FLOATS}), got bool"),
    # --- kl_penalty
    ("kl-estimator-unknown", "kl_penalty", lambda: ([_t(2, 3), _t(2, 3)], dict(estimator="k4")),
     ValueError, "estimator: expected one of ('k1', 'k2', 'k3', 'abs'), got 'k4'"),
    ("kl-estimator-none", "kl_penalty", lambda: ([_t(2, 3), _t(2, 3)], dict(estimator=None)),
     ValueError, "estimator: expected one of ('k1', 'k2', 'k3', 'abs'), got None"),
    ("kl-ref-int", "kl_penalty", lambda: ([_t(2, 3), torch.zeros(2, 3, dtype=torch.long)], {}),
     TypeError, f"ref_logprobs: expected dtype in ({FLOATS}), got int64"),
    # --- gae
    ("gae-mask-negative", "gae", lambda: ([_t(2, 3), _t(2, 3), _with(_m(), (1, 2), -1.0)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got -1.0 at index (1, 2)"),
    ("gae-gamma", "gae", lambda: ([_t(2, 3), _t(2, 3)], dict(gamma=1.5)),
     ValueError, "gamma: expected a number in [0.0, 1.0], got 1.5"),
    ("gae-lam-nan", "gae", lambda: ([_t(2, 3), _t(2, 3)], dict(lam=math.nan)),
     ValueError, "lam: expected a number in [0.0, 1.0], got nan"),
    ("gae-last-values-shape", "gae", lambda: ([_t(2, 3), _t(2, 3)], dict(last_values=_t(3))),
     ValueError, "last_values: expected shape (2,) (rewards.shape[:-1]), got (3,)"),
    # --- linear_ppo_loss
    ("ppo-target-too-big", "linear_ppo_loss",
     lambda: ([_t(2, 3, 8), _t(10, 8), _with(torch.zeros(2, 3, dtype=torch.long), (1, 1), 12), _t(2, 3), _t(2, 3)],
              {}),
     ValueError, "targets: expected class indices in [0, 10) or ignore_index=-100, got 12 at index (1, 1)"),
    ("ppo-mask-nan", "linear_ppo_loss", lambda: (_ppo_args()[0] + [_with(_m(), (0, 1), math.nan)], {}),
     ValueError, f"mask: expected {MASK_EXPECTED}, got nan at index (0, 1)"),
    ("ppo-ignore-index-float", "linear_ppo_loss", lambda: _ppo_args(ignore_index=5.5),
     TypeError, "ignore_index: expected an int, got float 5.5"),
    ("ppo-kl-coef-inf", "linear_ppo_loss", lambda: _ppo_args(kl_coef=math.inf),
     ValueError, "kl_coef: expected a finite number, got inf"),
    ("ppo-entropy-coef-str", "linear_ppo_loss", lambda: _ppo_args(entropy_coef="0"),
     ValueError, "entropy_coef: expected a finite number, got '0'"),
    ("ppo-hidden-1d", "linear_ppo_loss",
     lambda: ([_t(8), _t(10, 8), torch.tensor(0), torch.tensor(0.0), torch.tensor(0.0)], {}),
     ValueError, "hidden: expected at least 2 dimension(s), got shape (8,)"),
    ("ppo-bias-dtype", "linear_ppo_loss", lambda: _ppo_args(bias=_t(10, dtype=torch.bfloat16)),
     TypeError, "bias: expected dtype torch.float32 (the dtype of hidden), got torch.bfloat16"),
]


def _params():
    out = []
    for case_id, op, build, exc, msg in CASES:
        for b in available_backends(KERNELS[op], "cpu"):
            out.append(pytest.param(op, build, exc, msg, b, id=f"{case_id}-{b}"))
    return out


@pytest.mark.parametrize("op,build,exc,msg,backend", _params())
def test_bad_input_gives_the_same_named_error_on_every_backend(op, build, exc, msg, backend):
    args, kwargs = build()
    with use_backend(backend), pytest.raises(Exception) as info:
        getattr(ops, op)(*args, **kwargs)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert str(info.value) == msg


def test_every_op_has_bad_input_cases():
    assert {op for _, op, *_ in CASES} == set(KERNELS)


# --- not errors: one defined result on every backend -----------------------------------------------------------


def _all(op):
    return available_backends(KERNELS[op], "cpu")


def _agree(op, fn, grad_of=()):
    """Run ``fn()`` -> (outputs, leaves) on every backend; outputs (and leaves' gradients) equal the reference's."""
    results = {}
    for b in _all(op):
        with use_backend(b):
            out, leaves = fn()
            flat = [out] if isinstance(out, torch.Tensor) else list(out[:1]) + list(out[1].values()) \
                if isinstance(out, tuple) and isinstance(out[-1], dict) else list(out)
            diff = [t for t in flat if t.requires_grad]
            if diff:
                torch.autograd.backward(diff, [torch.ones_like(t) for t in diff])
            results[b] = (flat, [x.grad for x in leaves])
    ref = results["reference"]
    for b, (flat, grads) in results.items():
        for x, y in zip(flat, ref[0]):
            assert x.shape == y.shape and x.dtype == y.dtype, (b, x, y)
            assert torch.equal(torch.isnan(x), torch.isnan(y)), (b, x, y)
            fin = torch.isfinite(y)
            assert torch.equal(x[~fin & ~torch.isnan(y)], y[~fin & ~torch.isnan(y)]), (b, x, y)
            assert rel_err(x[fin], y[fin]) < 1e-5, (b, x, y)
        for gx, gy in zip(grads, ref[1]):
            assert (gx is None) == (gy is None)
            if gx is not None:
                assert gx.shape == gy.shape and rel_err(gx, gy) < 1e-5, (b, gx, gy)
    return ref


def _leaf(*shape):
    return _t(*shape).requires_grad_()


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batches_give_empty_outputs_and_zero_losses_on_every_backend(lead):
    def tok():
        x = _leaf(*lead, 10)
        return ops.token_logprobs(x, torch.zeros(lead, dtype=torch.long), return_entropy=True), [x]

    (lp, ent), (g,) = _agree("token_logprobs", tok)
    assert lp.shape == lead and ent.shape == lead and g.shape == lead + (10,)

    def lin():
        h, w = _leaf(*lead, 8), _leaf(10, 8)
        return ops.linear_token_logprobs(h, w, torch.zeros(lead, dtype=torch.long)), [h, w]

    (lp,), (gh, gw) = _agree("linear_token_logprobs", lin)
    assert lp.shape == lead and torch.equal(gw, torch.zeros(10, 8))

    def kl():
        x = _leaf(*lead)
        return ops.kl_penalty(x, _t(*lead)), [x]

    assert _agree("kl_penalty", kl)[0][0].shape == lead

    def gae():
        return ops.gae(_t(*lead), _t(*lead), torch.ones(lead)), []

    adv, ret = _agree("gae", gae)[0]
    assert adv.shape == lead and ret.shape == lead

    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        def surr(agg=agg):
            x = _leaf(*lead)
            return ops.clipped_surrogate(x, _t(*lead), _t(*lead), torch.ones(lead), aggregation=agg), [x]

        flat, (g,) = _agree("clipped_surrogate", surr)
        assert all(float(t.detach()) == 0.0 for t in flat) and g.shape == lead

        def value(agg=agg):
            x = _leaf(*lead)
            return ops.value_loss(x, _t(*lead), _t(*lead), clip=0.2, aggregation=agg), [x]

        flat, (g,) = _agree("value_loss", value)
        assert all(float(t.detach()) == 0.0 for t in flat) and g.shape == lead

    if len(lead) == 2:
        def ppo():
            h, w = _leaf(*lead, 8), _leaf(10, 8)
            return ops.linear_ppo_loss(h, w, torch.zeros(lead, dtype=torch.long), _t(*lead), _t(*lead),
                                       entropy_coef=0.01), [h, w]

        flat, (gh, gw) = _agree("linear_ppo_loss", ppo)
        assert all(float(t.detach()) == 0.0 for t in flat) and gh.shape == lead + (8,)
        assert torch.equal(gw, torch.zeros(10, 8))


def test_gae_with_no_time_steps():
    """T = 0 (the issue's internal RuntimeError): empty advantages and returns of the input shape."""
    for b in _all("gae"):
        with use_backend(b):
            adv, ret = ops.gae(torch.zeros(3, 0), torch.zeros(3, 0), last_values=torch.zeros(3))
        assert adv.shape == (3, 0) and ret.shape == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_logits_follow_log_softmax_on_every_backend(dtype):
    """+inf, NaN or only −inf in a counted row: NaN log-prob and entropy; a few −inf logits: p = 0 there, a finite
    result (−inf log-prob when it is the target) with finite gradients; ignored rows: 0 whatever they hold."""
    V = 12
    x = _t(7, V)
    x[0, 3] = math.inf  # +inf, target elsewhere
    x[1, 5] = math.inf  # +inf at the target
    x[2] = -math.inf  # only -inf
    x[3, 4] = math.nan
    x[4, :6] = -math.inf  # masked vocabulary, target outside it
    x[5, :6] = -math.inf  # masked vocabulary, target inside it: log-prob -inf
    x[6] = math.nan  # ignored row
    x = x.to(dtype)
    targets = _tgt([1, 5, 0, 2, 9, 2, -100])
    outs = {}
    for b in _all("token_logprobs"):
        with use_backend(b):
            leaf = x.clone().requires_grad_()
            lp, ent = ops.token_logprobs(leaf, targets, return_entropy=True)
            (torch.where(torch.isfinite(lp), lp, 0.0).sum() + torch.where(torch.isfinite(ent), ent, 0.0).sum()
             ).backward()
        outs[b] = (lp.detach(), ent.detach(), leaf.grad)
        assert torch.isnan(lp[:4]).all() and torch.isnan(ent[:4]).all(), b
        assert torch.isfinite(lp[4]) and lp[5] == -math.inf and torch.isfinite(ent[4:6]).all(), b
        assert lp[6] == 0 and ent[6] == 0 and (leaf.grad[6] == 0).all(), b
        assert torch.isfinite(leaf.grad[4:]).all(), b  # the gradient of a NaN row is unspecified
    for b, (lp, ent, g) in outs.items():
        ref_lp, ref_ent, ref_g = outs["reference"]
        assert rel_err(lp[4], ref_lp[4]) < 1e-5 and rel_err(ent[4:6], ref_ent[4:6]) < 1e-5, b
        assert rel_err(g[4:], ref_g[4:]) < 1e-2, b


def test_non_finite_counted_inputs_give_the_same_non_finite_results_on_every_backend():
    """NaN/±inf where a token counts: the same NaN/inf loss and statistics on every backend (ratio_min/max keep a
    NaN as torch.amin does; a masked NaN changes nothing, tests/ops/test_masked_garbage.py)."""
    for bad in (math.nan, math.inf, -math.inf):
        lp = _with(_t(2, 3), (0, 1), bad)
        mask = _with(_m(), (1, 2), 0.0)

        def surr(lp=lp, mask=mask):
            x = lp.clone().requires_grad_()
            return ops.clipped_surrogate(x, _t(2, 3), _t(2, 3), mask, dual_clip=3.0), []

        flat = _agree("clipped_surrogate", surr)[0]
        assert not torch.isfinite(torch.stack([t.detach() for t in flat])).all()

        def value(lp=lp, mask=mask):
            return ops.value_loss(lp.clone().requires_grad_(), _t(2, 3), _t(2, 3), mask, clip=0.2), []

        _agree("value_loss", value)

        def kl(lp=lp):
            return ops.kl_penalty(lp.clone().requires_grad_(), _t(2, 3), "k3"), []

        _agree("kl_penalty", kl)

        def gae(lp=lp, mask=mask):
            return ops.gae(lp, _t(2, 3), mask), []

        _agree("gae", gae)


def test_value_checks_run_on_cpu_only(monkeypatch):
    """Off the CPU (CUDA; simulated here) values are never read: an out-of-range target gives a NaN log-prob, its
    entropy as usual and no log-prob gradient, on every backend (the kernels never read it); masks are weights."""
    monkeypatch.setattr(_validate, "host_checkable", lambda x: False)
    x = _t(4, 10)
    targets = _tgt([1, 10, -3, -100])
    outs = {}
    for b in _all("token_logprobs"):
        with use_backend(b):
            leaf = x.clone().requires_grad_()
            lp, ent = ops.token_logprobs(leaf, targets, return_entropy=True)
            (torch.nan_to_num(lp).sum() + ent.sum()).backward()
        outs[b] = (lp, ent, leaf.grad)
        assert torch.isfinite(lp[0]) and torch.isnan(lp[1:3]).all() and lp[3] == 0, b
    ref = outs["reference"]
    for b, (lp, ent, g) in outs.items():
        assert rel_err(ent, ref[1]) < 1e-5 and rel_err(g, ref[2]) < 1e-5, b
    _, truth_ent = reference.token_logprobs(x.double(), _tgt([1, 1, 1, -100]), return_entropy=True)
    assert rel_err(ref[1], truth_ent) < 1e-5

    h, w = _t(4, 8), _t(10, 8)
    for b in _all("linear_token_logprobs"):
        with use_backend(b):
            lp = ops.linear_token_logprobs(h, w, targets)
        assert torch.isfinite(lp[0]) and torch.isnan(lp[1:3]).all() and lp[3] == 0, b
    for b in _all("linear_ppo_loss"):
        with use_backend(b):
            loss, _ = ops.linear_ppo_loss(h, w, targets, _t(4), _t(4))
        assert torch.isnan(loss), b
    for b in _all("clipped_surrogate"):  # a negative weight is not refused off the CPU: no error, no sync
        with use_backend(b):
            ops.clipped_surrogate(_t(2, 3), _t(2, 3), _t(2, 3), _with(_m(), (0, 0), -1.0))


def test_value_checks_are_skipped_while_compiling():
    """The value checks branch on tensor values: under torch.compile they would break the graph, so they are off
    there (and fullgraph tracing works with CPU tensors)."""
    torch._dynamo.reset()
    x, t, m = _t(3, 10), _tgt([1, 2, -100]), _m((3,))

    def f(x):
        return ops.token_logprobs(x, t).sum() + ops.clipped_surrogate(x[:, 0], x[:, 1], x[:, 2], m)[0]

    with use_backend("reference"):
        out = torch.compile(f, fullgraph=True, backend="eager")(x)
        assert rel_err(out, f(x)) < 1e-6


@pytest.mark.skipif("native" not in available_backends("token_logprobs_fwd"), reason="native extension unavailable")
def test_native_targets_check_agrees_with_the_plain_rule():
    """The one-pass native check of targets (csrc/cpu/logprobs.cpp) says "bad" exactly when the plain-torch rule
    does, for int64 and int32, contiguous or not, whatever ignore_index (inside or outside [0, V))."""
    check = _validate.TARGETS_CHECK()
    assert check is not None
    for trial in range(300):
        V = int(torch.randint(1, 40, ()))
        ignore_index = [-100, -1, 0, V, V - 1][trial % 5]
        t = torch.randint(-3, V + 3, (int(torch.randint(0, 50, ())),))
        t = torch.where(torch.rand(t.shape) < 0.7, torch.randint(0, V, t.shape), t)  # often all good
        t[torch.rand(t.shape) < 0.2] = ignore_index
        for x in (t, t.to(torch.int32), t.repeat(2)[::2]):
            expected = bool((((x < 0) | (x >= V)) & (x != ignore_index)).any())
            assert bool(check(x, V, ignore_index)) is expected, (x.tolist(), V, ignore_index)


def test_value_check_helpers_are_not_kernel_ops():
    """What counts as "Signal ran a kernel" (the benchmarks' loss rows, the plan tests) is a kernel op or its Triton
    twin, never a value-check helper: those run on every backend, the reference's included."""
    from signalrl.ops._library import KERNELS as KERNEL_OPS, is_kernel_op

    assert all(is_kernel_op(f"signalrl::{name}") and is_kernel_op(f"signalrl::{name}_interpreted")
               for name in KERNEL_OPS)
    assert not any(is_kernel_op(f"signalrl::{name}") for name in ("targets_check", "mask_check"))
    assert not is_kernel_op("aten::mm") and not is_kernel_op("other::token_logprobs_fwd")
