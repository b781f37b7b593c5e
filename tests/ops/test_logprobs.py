"""token_logprobs on every backend available here, against float64 truth (plus the op-layer tests both log-prob
ops share: dispatch, validation, torch.compile; linear_token_logprobs: test_linear_logprobs.py)."""
import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import SignalCheckError, available_backends, check_mode, use_backend

from ._oracle import assert_close, backend_params, break_kernel, rel_err

TOKEN = backend_params("token_logprobs_fwd")
TOKEN_BACKENDS = available_backends("token_logprobs_fwd")
DTYPES = [torch.float32, torch.bfloat16]


def _targets(shape, V, ignore_frac=0.2, ignore_index=-100, device="cpu"):
    t = torch.randint(0, V, shape)
    t[torch.rand(shape) < ignore_frac] = ignore_index
    return t.to(device)


def _truth_token(logits, targets, **kw):
    x = logits.detach().double().requires_grad_()
    lp, ent = reference.token_logprobs(x, targets, return_entropy=True, **kw)
    return x, lp, ent


def _run_token(backend, logits, targets, **kw):
    x = logits.detach().clone().requires_grad_()
    with use_backend(backend):
        lp, ent = ops.token_logprobs(x, targets, return_entropy=True, **kw)
    return x, lp, ent


@pytest.mark.parametrize("backend,device", TOKEN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,V,temperature,scale",
    [((37,), 1000, 1.0, 3.0), ((3, 5), 1031, 0.7, 3.0), ((1,), 1000, 1.0, 3.0), ((4,), 32000, 1.3, 5.0),
     ((6,), 1000, 1.0, 1e4)],
    ids=["N37-V1000", "B3T5-V1031-temp", "N1", "V32000", "huge-logits"],
)
def test_token_logprobs_values_and_grads(backend, device, dtype, shape, V, temperature, scale):
    logits = (torch.randn(*shape, V) * scale).to(dtype).to(device)
    targets = _targets(shape, V, device=device)
    kw = dict(temperature=temperature)
    x, lp, ent = _run_token(backend, logits, targets, **kw)
    xt, lp_t, ent_t = _truth_token(logits, targets, **kw)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == targets.shape
    # same-dtype PyTorch baseline: log_softmax computed in the input dtype
    xb = logits.detach().clone().requires_grad_()
    lsm = torch.log_softmax(xb / temperature, -1)
    valid = targets != -100
    lp_b = torch.where(valid, lsm.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0).float()
    assert_close("logprobs", lp, lp_t, dtype, baseline=lp_b)
    # A near-one-hot row has entropy ≈ log(1 + ε) with ε ≪ 1; the streaming sum s = 1 + ε holds ε to float32's
    # ulp(1) ≈ 1.2e-7, so entropy is held to 1e-5 relative or 1e-7 nats absolute (floor 1e-2 × tolerance 1e-5).
    assert_close("entropy", ent, ent_t, dtype, floor=1e-2)
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()

    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp_t * g_lp.double() + ent_t * g_ent.double()).sum().backward()
    (lp_b * g_lp).sum().backward()
    assert x.grad.dtype == dtype
    # ±1e4 logits included: the backends pass lse as float64 so p = exp(z − lse) keeps no float32 rounding of lse
    # (docs/backends.md); a float32 lse missed 1e-5 here by up to 2.4e-4.
    assert_close("d logits", x.grad, xt.grad, dtype)
    assert (x.grad[~valid] == 0).all()


@pytest.mark.parametrize("backend,device", TOKEN)
def test_token_logprobs_all_ignored(backend, device):
    logits = torch.randn(5, 1000, device=device, requires_grad=True)
    targets = torch.full((5,), -1, dtype=torch.long, device=device)
    with use_backend(backend):
        lp, ent = ops.token_logprobs(logits, targets, ignore_index=-1, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(lp, torch.zeros_like(lp)) and torch.equal(ent, torch.zeros_like(ent))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend,device", TOKEN)
def test_token_logprobs_without_entropy_matches(backend, device):
    logits = torch.randn(9, 1000, device=device)
    targets = _targets((9,), 1000, device=device)
    with use_backend(backend):
        lp = ops.token_logprobs(logits, targets)
    assert rel_err(lp, reference.token_logprobs(logits.double(), targets)) < 1e-5


@pytest.mark.parametrize("device", ["cuda" if torch.cuda.is_available() else "cpu"])
def test_inplace_backward_gives_the_same_gradient(device):
    if "triton" not in available_backends("token_logprobs_fwd", device):
        pytest.skip("in-place backward is a Triton feature; Triton is not usable here")
    logits = torch.randn(7, 1000, device=device)
    targets = _targets((7,), 1000, device=device)
    a = logits.clone().requires_grad_()
    with use_backend("triton"):
        ops.token_logprobs(a, targets).sum().backward()
        b = logits.clone().requires_grad_()
        y = b * 1.0  # the op owns this buffer: it may be overwritten with the gradient
        ops.token_logprobs(y, targets, inplace_backward=True).sum().backward()
    assert rel_err(b.grad, a.grad) < 1e-6


def test_reference_gradcheck_float64():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 8, 0])
    torch.autograd.gradcheck(
        lambda x: ops.token_logprobs(x, targets, temperature=0.8, return_entropy=True), (logits,)
    )
    hidden = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda h, w, b: ops.linear_token_logprobs(h, w, targets, bias=b, return_entropy=True), (hidden, weight, bias)
    )


def _near_tie_logits(N, V, seed=0):
    """Float32-exact logits near 8192 whose top three lie within 1 of each other: lse = 8192 + log(Σ e^{offsets}) is
    then no float32 (ulp 2^-10 there) and its float32 rounding would shift every p = exp(z − lse) by up to 5e-4
    relative. Offsets are multiples of 2^-10, so the logits themselves are exact."""
    g = torch.Generator().manual_seed(seed)
    steps = -torch.randint(0, 40 * 1024, (N, V), generator=g).double()  # the rest: 0 to 40 below the top
    top = torch.tensor([0.0, -307.0, -717.0], dtype=torch.float64)  # ≈ 0, −0.3, −0.7
    for i in range(N):
        cols = torch.randperm(V, generator=g)[:3]
        steps[i, cols] = top + torch.randint(-50, 50, (3,), generator=g).double()
    return 8192.0 + steps / 1024.0


@pytest.mark.parametrize("backend,device", TOKEN)
def test_token_logprobs_gradient_near_a_tie_at_huge_logits(backend, device):
    """lse crosses into the backward as float64 (docs/backends.md): a float32 lse fails this at ~1e-4."""
    N, V = 8, 1000
    z = _near_tie_logits(N, V)
    logits = z.float().to(device)
    assert torch.equal(logits.double().cpu(), z)
    targets = _targets((N,), V, ignore_frac=0.0, device=device)
    x, lp, ent = _run_token(backend, logits, targets)
    xt, lp_t, ent_t = _truth_token(logits, targets)
    assert_close("logprobs", lp, lp_t, torch.float32)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp_t * g_lp.double() + ent_t * g_ent.double()).sum().backward()
    assert_close("d logits", x.grad, xt.grad, torch.float32)


# --- dispatch, check mode, validation, compile ----------------------------------------------


def test_backend_listing_and_forcing(monkeypatch):
    x = torch.randn(3, 10)
    assert "reference" in TOKEN_BACKENDS
    with use_backend("reference"):
        assert ops.backend_for("token_logprobs_fwd", x) == "reference"
    monkeypatch.setenv("SIGNAL_BACKEND", "reference")
    assert ops.backend_for("token_logprobs_fwd", x) == "reference"
    monkeypatch.setenv("SIGNAL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SIGNAL_BACKEND"):
        ops.backend_for("token_logprobs_fwd", x)
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("fast"):
            pass


@pytest.mark.parametrize("backend,device", [p for p in TOKEN if p.values[0] != "reference"])
def test_check_mode_passes_and_catches_a_wrong_kernel(backend, device, monkeypatch):
    logits = torch.randn(8, 1000, device=device, requires_grad=True)
    targets = _targets((8,), 1000, device=device)
    with use_backend(backend), check_mode():
        lp, ent = ops.token_logprobs(logits, targets, return_entropy=True)
        (lp.sum() + ent.sum()).backward()  # gradients are checked too

    from signalrl.ops import logprobs as mod

    break_kernel(monkeypatch, mod.TOKEN_FWD, lambda args, out: (out[0] + 1e-3, *out[1:]))
    with use_backend(backend), check_mode(), pytest.raises(SignalCheckError, match="max abs error"):
        ops.token_logprobs(logits, targets)


def test_validation_errors_name_the_argument():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets: expected shape \\(4,\\)"):
        ops.token_logprobs(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="targets: expected dtype"):
        ops.token_logprobs(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="logits: expected dtype"):
        ops.token_logprobs(logits.long(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="weight: expected shape \\[V, 8\\]"):
        ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ops.linear_token_logprobs(torch.randn(4, 8), torch.randn(10, 8).bfloat16(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bias: expected shape \\[10\\]"):
        ops.linear_token_logprobs(
            torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), bias=torch.randn(9)
        )


@pytest.mark.parametrize("backend,device", TOKEN)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(300, 16, device=device, requires_grad=True)
    targets = _targets((2, 5), 300, device=device)

    def f(h, w):
        lp, ent = ops.linear_token_logprobs(h, w, targets, return_entropy=True)
        logits = h @ w.t()
        return lp.sum() + ent.mean() + ops.token_logprobs(logits, targets).sum()

    with use_backend(backend):
        eager = f(hidden, weight)
        g_eager = torch.autograd.grad(eager, (hidden, weight))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(hidden, weight)
        g = torch.autograd.grad(out, (hidden, weight))
    assert rel_err(out, eager) < 1e-5
    for a, b in zip(g, g_eager):
        assert rel_err(a, b) < 1e-5
