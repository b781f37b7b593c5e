"""kl_penalty on every backend, against float64 truth."""
import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import SignalCheckError, available_backends, check_mode, use_backend

from ._oracle import assert_close, break_kernel, rel_err

KL_BACKENDS = available_backends("kl_penalty_fwd")
ESTIMATORS = list(reference.KL_ESTIMATORS)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 7), (1,), (1029,)], ids=["B5T37", "3d", "N1", "N1029"])
def test_kl_penalty_values_and_grads(backend, dtype, estimator, shape):
    lp = (torch.rand(shape) * -4.0).to(dtype)
    ref = (lp.float() + torch.randn(shape) * 0.5).to(dtype)
    x, r = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    with use_backend(backend):
        kl = ops.kl_penalty(x, r, estimator)
    xt, rt = lp.double().requires_grad_(), ref.double().requires_grad_()
    kl_t = reference.kl_penalty(xt, rt, estimator)
    assert kl.dtype == torch.float32 and kl.shape == lp.shape
    # same-dtype PyTorch baseline
    xb, rb = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    d = xb - rb
    kl_b = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1.0, "abs": d.abs()}[estimator]
    g = torch.randn(shape)
    (kl * g).sum().backward()
    (kl_t * g.double()).sum().backward()
    (kl_b * g.to(dtype)).sum().backward()
    assert x.grad.dtype == dtype and r.grad.dtype == dtype
    assert_close("kl", kl, kl_t, dtype, baseline=kl_b)
    assert_close("d logprobs", x.grad, xt.grad, dtype, baseline=xb.grad)
    assert_close("d ref_logprobs", r.grad, rt.grad, dtype, baseline=rb.grad)


def _k3_at(backend, d, lp0):
    """k3 and its logprobs gradient on ``backend`` at lp − ref = d (lp = lp0), with the exact float64 d of the
    float32 inputs: -> (kl, grad, dd)."""
    lp = torch.full_like(d, lp0)
    ref = lp - d
    x = lp.clone().requires_grad_()
    with use_backend(backend):
        kl = ops.kl_penalty(x, ref, "k3")
    kl.sum().backward()
    return kl, x.grad, lp.double() - ref.double()


@pytest.mark.parametrize("backend", [b for b in KL_BACKENDS if b != "reference"] or ["none"])
def test_k3_has_no_cancellation_near_zero(backend):
    """k3 = exp(−d) + d − 1 ≈ d²/2 and its derivative 1 − exp(−d) ≈ d for small d: every element
    to 1e-6 relative, across the switch between the series and the closed form at |d| = 1/2."""
    if backend == "none":
        pytest.skip("no fast backend on this machine")
    mags = torch.logspace(-6, 0.6, 97)
    d = torch.cat([mags, -mags, torch.tensor([0.0, 0.49999, 0.5, -0.5, 0.50001])])
    kl, grad, dd = _k3_at(backend, d, -1.0)
    kl_t, g_t = torch.expm1(-dd) + dd, -torch.expm1(-dd)
    assert ((kl.double() - kl_t).abs() <= 1e-6 * kl_t.abs()).all()
    assert ((grad.double() - g_t).abs() <= 1e-6 * g_t.abs()).all()


@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_k3_far_from_the_reference_to_float32_overflow(backend):
    """k3 = exp(−d) + d − 1 for d down to where exp(−d) leaves float32 (−88.72): finite and within float32 rounding
    of the float64 value until then, inf after, as torch.exp; for large d, e^{−d} vanishes beside d."""
    d = torch.tensor([-88.0, -88.3, -88.5, -88.7, -88.75, -95.0, 50.0, 88.5, 103.0, 110.0])
    kl, grad, dd = _k3_at(backend, d, -2.0)
    kl_t, g_t = torch.exp(-dd) + dd - 1, 1 - torch.exp(-dd)
    finite = kl_t < torch.finfo(torch.float32).max
    assert torch.isfinite(kl[finite]).all() and torch.isinf(kl[~finite]).all(), kl
    assert ((kl.double() - kl_t)[finite].abs() <= 1e-6 * kl_t[finite].abs()).all(), (kl, kl_t)
    assert ((grad.double() - g_t)[finite].abs() <= 1e-6 * g_t[finite].abs()).all(), (grad, g_t)


@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_kl_penalty_known_values_and_only_requested_grads(backend):
    lp = torch.tensor([0.0, -1.0, -2.0, -0.5])
    ref = torch.tensor([0.0, -2.0, -1.0, -0.5])
    d = lp - ref  # 0, 1, -1, 0
    with use_backend(backend):
        assert torch.allclose(ops.kl_penalty(lp, ref, "k1"), d)
        assert torch.allclose(ops.kl_penalty(lp, ref, "k2"), 0.5 * d * d)
        assert torch.allclose(ops.kl_penalty(lp, ref, "k3"), torch.exp(-d) + d - 1)
        assert torch.equal(ops.kl_penalty(lp, ref, "abs"), d.abs())
        assert (ops.kl_penalty(lp, ref, "k3") >= 0).all()
        x = lp.clone().requires_grad_()
        ops.kl_penalty(x, ref, "abs").sum().backward()  # ref needs no gradient
    assert torch.equal(x.grad, torch.sign(d))  # |d|' = sign(d), 0 at d = 0 like torch


@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_kl_penalty_mixed_dtypes_and_nan(backend):
    lp = torch.randn(3, 4).bfloat16()
    ref = torch.randn(3, 4)
    ref[1, 2] = float("nan")
    with use_backend(backend):
        kl = ops.kl_penalty(lp, ref)
    truth = reference.kl_penalty(lp.double(), ref.double())
    assert torch.isnan(kl[1, 2]) and torch.isnan(kl).sum() == 1
    ok = ~torch.isnan(truth)
    assert rel_err(kl[ok], truth[ok]) < 1e-5


@pytest.mark.parametrize("backend", [b for b in KL_BACKENDS if b != "reference"] or ["none"])
def test_check_mode_passes_and_catches_a_wrong_kernel(backend, monkeypatch):
    if backend == "none":
        pytest.skip("no fast backend on this machine")
    lp = torch.randn(4, 9, requires_grad=True)
    ref = torch.randn(4, 9)
    with use_backend(backend), check_mode():
        ops.kl_penalty(lp, ref, "k2").sum().backward()

    from signalrl.ops import kl as mod

    break_kernel(monkeypatch, mod.KL_BWD, lambda args, out: out * 1.001)
    with use_backend(backend), check_mode(), pytest.raises(SignalCheckError, match="gradient"):
        ops.kl_penalty(lp, ref, "k2").sum().backward()


def test_validation_errors_name_the_argument():
    lp = torch.randn(4, 6)
    with pytest.raises(ValueError, match="ref_logprobs: expected shape \\(4, 6\\)"):
        ops.kl_penalty(lp, torch.randn(4, 5))
    with pytest.raises(TypeError, match="ref_logprobs: expected dtype"):
        ops.kl_penalty(lp, torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="estimator: expected one of"):
        ops.kl_penalty(lp, lp, "k4")


@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    lp = torch.randn(2, 9, requires_grad=True)
    ref = torch.randn(2, 9, requires_grad=True)

    def f(a, b):
        return ops.kl_penalty(a, b, "k3").mean() + ops.kl_penalty(a, b, "abs").sum()

    with use_backend(backend):
        eager = f(lp, ref)
        g_eager = torch.autograd.grad(eager, (lp, ref))
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(lp, ref)
        g = torch.autograd.grad(out, (lp, ref))
    assert rel_err(out, eager) < 1e-6
    for a, b in zip(g, g_eager):
        assert rel_err(a, b) < 1e-6
