"""linear_token_logprobs on every backend available here, against float64 truth."""
import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import use_backend

from ._oracle import assert_close, backend_params
from .test_logprobs import DTYPES, _near_tie_logits, _targets

LINEAR = backend_params("linear_token_logprobs_fwd")


@pytest.mark.parametrize("backend,device", LINEAR)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "shape,V,H,temperature", [((37,), 1000, 48, 1.0), ((2, 7), 1031, 40, 0.7), ((1,), 1000, 48, 1.0)],
    ids=["N37-V1000", "B2T7-V1031-temp", "N1"],
)
def test_linear_token_logprobs_values_and_grads(backend, device, dtype, with_bias, shape, V, H, temperature):
    hidden = torch.randn(*shape, H).to(dtype).to(device)
    weight = (torch.randn(V, H) / H**0.5).to(dtype).to(device)
    bias = torch.randn(V).to(dtype).to(device) if with_bias else None
    targets = _targets(shape, V, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    with use_backend(backend):
        lp, ent = ops.linear_token_logprobs(
            leaves[0], leaves[1], targets, bias=leaves[2] if with_bias else None, temperature=temperature,
            return_entropy=True,
        )
    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    lp_t, ent_t = reference.linear_token_logprobs(
        truth_leaves[0], truth_leaves[1], targets, bias=truth_leaves[2] if with_bias else None,
        temperature=temperature, return_entropy=True,
    )
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    assert_close("logprobs", lp, lp_t, dtype)
    assert_close("entropy", ent, ent_t, dtype)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp_t * g_lp.double() + ent_t * g_ent.double()).sum().backward()
    for name, got, truth in zip(("d hidden", "d weight", "d bias"), leaves, truth_leaves):
        assert got.grad.dtype == dtype
        assert_close(name, got.grad, truth.grad, dtype)


@pytest.mark.parametrize("backend,device", LINEAR)
def test_linear_only_requested_grads(backend, device):
    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(1000, 16, device=device)  # frozen LM head
    targets = _targets((6,), 1000, device=device)
    with use_backend(backend):
        ops.linear_token_logprobs(hidden, weight, targets).sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend,device", LINEAR)
def test_linear_token_logprobs_gradient_near_a_tie_at_huge_logits(backend, device):
    """The same near-tie rows from hidden [N, 8] (only the first feature nonzero, 1) and a weight whose first column
    is the logits: the product is exact in float32, the other columns still carry d hidden."""
    N, V, H = 8, 1000, 8
    z = _near_tie_logits(N, V, seed=1)
    hidden = torch.zeros(N, H)
    hidden[:, 0] = 8192.0
    weight = torch.randn(V, H)
    weight[:, 0] = (z / 8192.0).float()[0]  # one row pattern for the head; each row of z differs only via targets
    targets = _targets((N,), V, ignore_frac=0.0)
    leaves = [t.clone().to(device).requires_grad_() for t in (hidden, weight)]
    with use_backend(backend):
        lp, ent = ops.linear_token_logprobs(leaves[0], leaves[1], targets.to(device), return_entropy=True)
    truth = [t.double().requires_grad_() for t in (hidden, weight)]
    lp_t, ent_t = reference.linear_token_logprobs(truth[0], truth[1], targets, return_entropy=True)
    assert_close("logprobs", lp, lp_t, torch.float32)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    (lp * g_lp.to(device) + ent * g_ent.to(device)).sum().backward()
    (lp_t * g_lp.double() + ent_t * g_ent.double()).sum().backward()
    assert_close("d hidden", leaves[0].grad, truth[0].grad, torch.float32)
    assert_close("d weight", leaves[1].grad, truth[1].grad, torch.float32)
