"""clipped_surrogate / value_loss (and the fused PPO token kernel) on every backend, against float64 truth."""
import math

import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import SignalCheckError, available_backends, check_mode, use_backend

from ._oracle import assert_close, break_kernel, off_ratio_bounds, rel_err, tol_for

PPO_BACKENDS = available_backends("ppo_token_fwd")
VALUE_BACKENDS = available_backends("value_loss_fwd")
FAST = [b for b in PPO_BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16]
AGGREGATIONS = list(reference.AGGREGATIONS)


def make_mask(kind: str, shape) -> torch.Tensor | None:
    """None, random, left/right padding, masked spans inside rows, or nothing counted."""
    if kind == "none":
        return None
    T = shape[-1]
    rows = math.prod(shape[:-1])
    if kind == "random":
        m = torch.rand(rows, T) > 0.3
    elif kind in ("left", "right"):
        lengths = torch.randint(0, T + 1, (rows, 1))
        pos = torch.arange(T).expand(rows, T)
        m = pos >= (T - lengths) if kind == "left" else pos < lengths
    elif kind == "spans":
        m = torch.ones(rows, T, dtype=torch.bool)
        for r in range(rows):
            a = int(torch.randint(0, T, ()))
            b = int(torch.randint(a, T + 1, ()))
            m[r, a:b] = False
    elif kind == "all-masked":
        m = torch.zeros(rows, T, dtype=torch.bool)
    else:
        raise ValueError(kind)
    return m.reshape(shape)


def ppo_inputs(shape, dtype, spread=0.4):
    lp = (torch.rand(shape) * -3.0).to(dtype)
    old = off_ratio_bounds(lp, (lp.float() + torch.randn(shape) * spread).to(dtype))  # ratios well outside [0.8, 1.2]
    adv = torch.randn(shape)
    return lp, old, adv


def assert_loss_close(loss, truth, scale, dtype, baseline=None):
    """A scalar that is a signed sum can cancel to ~0: measure its error against the aggregate of
    |ℓ| (the scale of the summands), not against its own size."""
    scale = max(float(scale), 1e-30)
    err = abs(float(loss.detach()) - float(truth.detach())) / scale
    tol = tol_for(dtype)
    assert err <= tol, f"loss: error {err:.3e} (relative to Σw|ℓ|) > {tol:.1e}"
    if baseline is not None and dtype == torch.bfloat16:
        bound = max(2 * abs(float(baseline.detach()) - float(truth.detach())) / scale, 2.0**-8)
        assert err <= bound, f"loss: error {err:.3e} worse than same-dtype PyTorch bound {bound:.3e}"


def _stat_close(name, got, truth, count, dtype):
    g, t = float(got), float(truth)
    if name.endswith("fraction"):  # token counts: exact (a ratio within 1e-7 of a clip bound is ~never drawn)
        assert abs(g - t) <= 1e-6, (name, g, t, count)
    else:
        assert abs(g - t) <= 1e-5 * max(1.0, abs(t)), (name, g, t)


# --- clipped_surrogate ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", PPO_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize(
    "shape,mask_kind,clip_high,dual_clip",
    [((5, 37), "random", None, None), ((3, 11), "left", 0.28, 1.5), ((4, 9), "right", None, 2.0),
     ((2, 3, 7), "spans", 0.3, None), ((13,), "none", None, 1.2), ((1, 1), "none", None, None)],
    ids=["B5T37-random", "left-cliphigh-dual", "right-dual", "3d-spans", "1d-dual", "T1"],
)
def test_clipped_surrogate_values_and_grads(backend, dtype, aggregation, shape, mask_kind, clip_high, dual_clip):
    lp, old, adv = ppo_inputs(shape, dtype)
    mask = make_mask(mask_kind, shape)
    kw = dict(clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation)
    x = lp.clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.clipped_surrogate(x, old, adv, mask, **kw)
    xt = lp.double().requires_grad_()
    loss_t, stats_t = reference.clipped_surrogate(xt, old.double(), adv.double(), mask, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert list(stats) == list(stats_t)
    # same-dtype PyTorch baseline: the surrogate computed in the input dtype
    xb = lp.clone().requires_grad_()
    ratio = torch.exp(xb - old)
    pt = torch.maximum(-adv.to(dtype) * ratio, -adv.to(dtype) * ratio.clamp(0.8, 1.0 + (clip_high or 0.2)))
    if dual_clip is not None:
        pt = torch.where(adv < 0, torch.minimum(pt, (-adv * dual_clip).to(dtype)), pt)
    loss_b = reference.aggregate(pt, mask, aggregation)
    ratio64 = torch.exp(lp.double() - old.double())
    scale = reference.aggregate(adv.double().abs() * torch.maximum(ratio64, torch.ones_like(ratio64) * 1.3), mask, aggregation)
    assert_loss_close(loss, loss_t, scale, dtype, baseline=loss_b)
    loss.backward()
    loss_t.backward()
    loss_b.backward()
    assert x.grad.dtype == dtype
    assert_close("d logprobs", x.grad, xt.grad, dtype, baseline=xb.grad)
    count = int(mask.sum()) if mask is not None else lp.numel()
    for k in stats_t:
        assert stats[k].dtype == torch.float32 and stats[k].shape == ()
        _stat_close(k, stats[k], stats_t[k], count, dtype)


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_clipped_surrogate_exercises_every_branch(backend):
    # ratios far outside the clip range on both sides, both signs of A, dual-clip active
    lp = torch.zeros(4, 8)
    old = torch.tensor([-1.0, 1.0, 0.0, 0.05]).repeat_interleave(2).expand(4, 8).clone()
    adv = torch.tensor([1.0, -1.0]).repeat(4, 4)
    x = lp.clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.clipped_surrogate(x, old, adv, dual_clip=1.5)
    loss.backward()
    xt = lp.double().requires_grad_()
    loss_t, stats_t = reference.clipped_surrogate(xt, old.double(), adv.double(), dual_clip=1.5)
    loss_t.backward()
    assert rel_err(loss, loss_t) < 1e-6 and rel_err(x.grad, xt.grad) < 1e-6
    assert 0 < float(stats["clip_fraction"]) < 1 and float(stats["dual_clip_fraction"]) > 0
    for k in stats_t:
        assert abs(float(stats[k]) - float(stats_t[k])) < 1e-6, k


@pytest.mark.parametrize("backend", PPO_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_clipped_surrogate_all_masked(backend, aggregation):
    lp, old, adv = ppo_inputs((3, 5), torch.float32)
    x = lp.clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.clipped_surrogate(x, old, adv, torch.zeros(3, 5), aggregation=aggregation)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(lp))
    assert all(float(s) == 0.0 for s in stats.values())


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_clipped_surrogate_nan_is_not_hidden(backend):
    lp, old, adv = ppo_inputs((2, 6), torch.float32)
    lp[1, 3] = float("nan")
    with use_backend(backend):
        loss, stats = ops.clipped_surrogate(lp, old, adv)
    assert torch.isnan(loss) and torch.isnan(stats["ratio_mean"])


# --- the fused token kernel with KL and entropy (what linear_ppo_loss uses) ------------------


def _token_fwd_kernel(backend):
    """The backend's ppo_token_fwd: Triton with small blocks and 3 programs (the persistent loop and the
    partial-stat reduction), native as it is (its fixed chunks of 4096 tokens are crossed by the shape)."""
    if backend == "triton":
        from signalrl.kernels import ppo as K

        return lambda *args: K.ppo_token_fwd(*args, _block=16, _programs=3), (5, 37)
    from signalrl.ops.ppo import PPO_TOKEN_FWD

    return PPO_TOKEN_FWD.op(backend, torch.device("cpu")), (3, 3001)


@pytest.mark.parametrize("backend", FAST or ["none"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dual_clip", [None, 1.3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ppo_token_fwd_with_kl_entropy_multi_program(backend, estimator, dual_clip, dtype):
    """The kernel function with KL and entropy terms against the float64 composition of the reference."""
    if backend == "none":
        pytest.skip("no fast backend on this machine")
    from signalrl.kernels import ppo as K
    from signalrl.ops import token_weights

    fwd, shape = _token_fwd_kernel(backend)
    lp, old, adv = ppo_inputs(shape, dtype)
    ref = (lp.float() + torch.randn(shape) * 0.3).to(dtype)
    ent = (torch.rand(shape) * 3).to(dtype)
    mask = make_mask("random", shape)
    w = token_weights(mask, "seq-mean-token-mean")
    kl_coef, ent_coef = 0.1, 0.01
    loss, g_lp, g_ent, stats = fwd(
        lp.reshape(-1), old.reshape(-1), adv.reshape(-1), w.reshape(-1), mask.float().reshape(-1),
        ref.reshape(-1), ent.reshape(-1), 0.2, 0.25, dual_clip, estimator, kl_coef, ent_coef, None,
    )
    xt = lp.double().requires_grad_()
    m = mask.double()
    pg, st = reference.clipped_surrogate(
        xt, old.double(), adv.double(), m, clip_low=0.2, clip_high=0.25, dual_clip=dual_clip,
        aggregation="seq-mean-token-mean",
    )
    kl = reference.kl_penalty(xt, ref.double(), estimator)
    total = pg + kl_coef * reference.aggregate(kl, m, "seq-mean-token-mean") \
        - ent_coef * reference.aggregate(ent.double(), m, "seq-mean-token-mean")
    total.backward()
    ratio64 = torch.exp(lp.double() - old.double())
    per_abs = adv.double().abs() * torch.maximum(ratio64, torch.ones_like(ratio64) * 1.3) \
        + kl_coef * kl.detach().abs() + ent_coef * ent.double()
    assert_loss_close(loss, total, reference.aggregate(per_abs, m, "seq-mean-token-mean"), torch.float32)
    assert rel_err(g_lp.reshape(shape), xt.grad) < 1e-5
    assert rel_err(g_ent.reshape(shape), -ent_coef * w.double()) < 1e-6
    truth = dict(st, pg_loss=pg, entropy=reference.masked_mean(ent.double(), m), kl=reference.masked_mean(kl, m))
    assert len(stats) == len(K.PPO_STAT_KEYS)
    count = int(mask.sum())
    for i, k in enumerate(K.PPO_STAT_KEYS):
        _stat_close(k, stats[i], truth[k].detach(), count, dtype)


# --- value_loss -----------------------------------------------------------------------------


def value_inputs(shape, dtype):
    values = torch.randn(shape).to(dtype)
    old = (values.float() + torch.randn(shape) * 0.3).to(dtype)
    returns = values.float() + torch.randn(shape)
    return values, old, returns


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize(
    "shape,mask_kind,clip",
    [((5, 37), "random", 0.2), ((3, 11), "left", None), ((4, 9), "right", 0.5), ((2, 3, 7), "spans", 0.1),
     ((13,), "none", 0.2), ((1, 1), "none", None)],
    ids=["B5T37-random-clip", "left-noclip", "right-clip", "3d-spans", "1d", "T1"],
)
def test_value_loss_values_and_grads(backend, dtype, aggregation, shape, mask_kind, clip):
    values, old, returns = value_inputs(shape, dtype)
    mask = make_mask(mask_kind, shape)
    x = values.clone().requires_grad_()
    with use_backend(backend):
        loss, stats = ops.value_loss(x, old, returns, mask, clip=clip, aggregation=aggregation)
    xt = values.double().requires_grad_()
    loss_t, stats_t = reference.value_loss(xt, old.double(), returns.double(), mask, clip=clip, aggregation=aggregation)
    assert list(stats) == list(stats_t) and loss.dtype == torch.float32
    # same-dtype PyTorch baseline
    xb = values.clone().requires_grad_()
    err = (xb - returns.to(dtype)) ** 2
    if clip is not None:
        vc = old + torch.clamp(xb - old, -clip, clip)
        err = torch.maximum(err, (vc - returns.to(dtype)) ** 2)
    loss_b = reference.aggregate(0.5 * err, mask, aggregation)
    assert_close("loss", loss, loss_t, dtype, baseline=loss_b.float())  # a sum of squares: no cancellation
    loss.backward()
    loss_t.backward()
    loss_b.backward()
    assert x.grad.dtype == dtype
    assert_close("d values", x.grad, xt.grad, dtype, baseline=xb.grad)
    count = int(mask.sum()) if mask is not None else values.numel()
    for k in stats_t:
        if k == "explained_variance":  # a ratio of two variances: relative, looser when Var(R) is small
            assert abs(float(stats[k]) - float(stats_t[k])) <= 1e-4 * max(1.0, abs(float(stats_t[k]))), k
        else:
            _stat_close(k, stats[k], stats_t[k], count, dtype)


def _value_fwd_kernel(case):
    """(n, kernel) for the value-loss partial-statistics cases: Triton with small blocks and several programs
    (the Welford merge within a program and, 13 programs finishing in chunks of 4, across chunks of the finishing
    kernel); native across three of its 4096-token chunks (the chunked two-pass variance, merged in order)."""
    if case.startswith("triton"):
        from signalrl.kernels import ppo as K

        programs = 4 if case == "triton-4-programs" else None
        return 200, lambda *a: K.value_loss_fwd(*a, _block=16, _programs=programs, _finish_block=4)
    from signalrl.ops.ppo import VALUE_LOSS_FWD

    return 3 * 4096 + 17, VALUE_LOSS_FWD.op("native", torch.device("cpu"))


@pytest.mark.parametrize("case", [c for c in ("triton-4-programs", "triton-13-programs", "native-3-chunks")
                                  if c.split("-")[0] in FAST] or ["none"])
def test_value_loss_fwd_partial_statistics(case):
    """A large common offset in the returns would wreck a sum-of-squares formula for the explained variance."""
    if case == "none":
        pytest.skip("no fast backend on this machine")
    n, fwd = _value_fwd_kernel(case)
    values = torch.randn(n) + 1000.0
    returns = values + torch.randn(n) * 0.5
    old = values + torch.randn(n) * 0.1
    mask = (torch.rand(n) > 0.2).float()
    w = mask / mask.sum()
    loss, g, stats = fwd(values, old, returns, w, mask, 0.05)
    xt = values.double().requires_grad_()
    loss_t, st = reference.value_loss(xt, old.double(), returns.double(), mask.double(), clip=0.05)
    loss_t.backward()
    # at |v| ≈ 1000, rounding old + clip(v − old) costs float32 ~1e-4: compare with float32 PyTorch
    x32 = values.clone().requires_grad_()
    loss_32, _ = reference.value_loss(x32, old, returns, mask, clip=0.05)
    loss_32.backward()
    assert rel_err(loss, loss_t) <= max(1e-5, 2 * rel_err(loss_32, loss_t))
    assert rel_err(g, xt.grad) <= max(1e-5, 2 * rel_err(x32.grad, xt.grad))
    ev_tol = 1e-3 if case.startswith("triton") else 1e-5  # float32 Welford vs float64 sums
    assert abs(float(stats[1]) - float(st["explained_variance"])) < ev_tol
    assert abs(float(stats[0]) - float(st["value_clip_fraction"])) <= 1e-6
    assert abs(float(stats[2]) - float(st["value_mean"])) <= 1e-5 * 1000
    assert abs(float(stats[3]) - float(st["return_mean"])) <= 1e-5 * 1000


@pytest.mark.skipif("triton" not in FAST, reason="no Triton backend here")
def test_ppo_token_fwd_many_programs():
    """22 programs, finishing chunks of 4: the partial rows are reduced over several chunks (sums, min, max)."""
    from signalrl.kernels import ppo as K

    n = 350
    lp, old, adv = ppo_inputs((n,), torch.float32)
    mask = (torch.rand(n) > 0.2).float()
    w = mask / mask.sum()
    loss, g, _, stats = K.ppo_token_fwd(
        lp, old, adv, w, mask, None, None, 0.2, 0.2, None, "k3", 0.0, 0.0, _block=16, _finish_block=4
    )
    xt = lp.double().requires_grad_()
    loss_t, st = reference.clipped_surrogate(xt, old.double(), adv.double(), mask.double())
    loss_t.backward()
    ratio64 = torch.exp(lp.double() - old.double())
    assert_loss_close(loss, loss_t, reference.aggregate(adv.double().abs() * ratio64.clamp_min(1.3), mask.double()),
                      torch.float32)
    assert rel_err(g, xt.grad) < 1e-5
    for i, k in enumerate(K.PPO_STAT_KEYS[:6]):
        _stat_close(k, stats[i], st[k], int(mask.sum()), torch.float32)
    assert abs(float(stats[6]) - float(loss_t.detach())) < 1e-5


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_value_loss_all_masked_and_constant_returns(backend):
    values, old, returns = value_inputs((3, 5), torch.float32)
    with use_backend(backend):
        loss, stats = ops.value_loss(values, old, returns, torch.zeros(3, 5), clip=0.2)
        assert float(loss) == 0.0 and all(float(s) == 0.0 for s in stats.values())
        _, stats = ops.value_loss(values, old, torch.full((3, 5), 2.0))
        assert float(stats["explained_variance"]) == 0.0  # Var(R) = 0


# --- dispatch, check mode, validation, compile ----------------------------------------------


@pytest.mark.parametrize("backend", FAST or ["none"])
def test_check_mode_passes_and_catches_a_wrong_kernel(backend, monkeypatch):
    if backend == "none":
        pytest.skip("no fast backend on this machine")
    lp, old, adv = ppo_inputs((3, 7), torch.float32)
    x = lp.clone().requires_grad_()
    values, vold, returns = value_inputs((3, 7), torch.float32)
    vx = values.clone().requires_grad_()
    mask = make_mask("random", (3, 7))
    with use_backend(backend), check_mode():
        loss, _ = ops.clipped_surrogate(x, old, adv, mask, dual_clip=2.0)
        vloss, _ = ops.value_loss(vx, vold, returns, mask, clip=0.2)
        (loss + vloss).backward()

    from signalrl.ops import ppo as mod

    def wrong_gradient(args, out):  # the same loss, 1.01 × its gradient
        loss, g, ge, stats = out
        extra = 0.01 * (args[0].float() * g).sum()
        return loss + (extra - extra.detach()), g, ge, stats

    break_kernel(monkeypatch, mod.PPO_TOKEN_FWD, wrong_gradient)
    with use_backend(backend), check_mode(), pytest.raises(SignalCheckError, match="gradient"):
        x.grad = None
        loss, _ = ops.clipped_surrogate(x, old, adv, mask)
        loss.backward()


def test_validation_errors_name_the_argument():
    lp, old, adv = ppo_inputs((4, 6), torch.float32)
    with pytest.raises(ValueError, match="old_logprobs: expected shape \\(4, 6\\)"):
        ops.clipped_surrogate(lp, old[:, :5], adv)
    with pytest.raises(TypeError, match="advantages: expected dtype"):
        ops.clipped_surrogate(lp, old, adv.long())
    with pytest.raises(ValueError, match="mask: expected shape"):
        ops.clipped_surrogate(lp, old, adv, torch.ones(4, 5))
    with pytest.raises(ValueError, match="dual_clip: expected None or a number > 1"):
        ops.clipped_surrogate(lp, old, adv, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        ops.clipped_surrogate(lp, old, adv, clip_low=-0.1)
    with pytest.raises(ValueError, match="aggregation: expected one of"):
        ops.clipped_surrogate(lp, old, adv, aggregation="mean")
    with pytest.raises(ValueError, match="returns: expected shape"):
        ops.value_loss(lp, old, adv[:3])
    with pytest.raises(ValueError, match="clip: expected a positive number"):
        ops.value_loss(lp, old, adv, clip=0.0)
    with pytest.raises(TypeError, match="values: expected a torch.Tensor"):
        ops.value_loss(lp.tolist(), old, adv)


def test_float64_runs_the_reference():
    lp, old, adv = ppo_inputs((3, 4), torch.float64)
    loss, stats = ops.clipped_surrogate(lp, old, adv)
    loss_t, _ = reference.clipped_surrogate(lp, old, adv)
    assert loss.dtype == torch.float64 and torch.equal(loss, loss_t)


@pytest.mark.parametrize("backend", PPO_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    lp, old, adv = ppo_inputs((2, 9), torch.float32)
    values, vold, returns = value_inputs((2, 9), torch.float32)
    mask = make_mask("random", (2, 9))

    def f(x, v):
        loss, stats = ops.clipped_surrogate(x, old, adv, mask, clip_high=0.3, dual_clip=3.0)
        vloss, vstats = ops.value_loss(v, vold, returns, mask, clip=0.2, aggregation="seq-mean-token-sum")
        return loss + 0.5 * vloss, stats["clip_fraction"] + vstats["explained_variance"]

    x, vx = lp.clone().requires_grad_(), values.clone().requires_grad_()
    with use_backend(backend):
        eager, s_eager = f(x, vx)
        g_eager = torch.autograd.grad(eager, (x, vx))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out, s = compiled(x, vx)
        g = torch.autograd.grad(out, (x, vx))
    assert rel_err(out, eager) < 1e-6 and rel_err(s, s_eager) < 1e-6
    for a, b in zip(g, g_eager):
        assert rel_err(a, b) < 1e-6
