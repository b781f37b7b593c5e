"""masked_mean / masked_whiten / group_normalize: the op wrappers against independent float64 formulas."""
import pytest
import torch

import signalrl.ops as ops

from .test_ppo import make_mask


def _truth_mean(x, m):
    x = x.double()
    return (x * m).sum() / m.sum() if m.sum() > 0 else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "random", "left", "all-masked"])
def test_masked_mean_and_whiten(dtype, mask_kind):
    x = (torch.randn(4, 23) * 3 + 1).to(dtype)
    mask = make_mask(mask_kind, (4, 23))
    m = torch.ones(4, 23, dtype=torch.float64) if mask is None else mask.double()
    mean = ops.masked_mean(x, mask)
    assert mean.dtype == torch.float32 and mean.shape == ()
    assert abs(float(mean) - float(_truth_mean(x, m))) < 1e-5 * max(1.0, abs(float(_truth_mean(x, m))))
    # per-row mean over dim=-1: empty rows give 0, not NaN
    rows = ops.masked_mean(x, mask, dim=-1)
    truth_rows = torch.stack([_truth_mean(x[i], m[i]) for i in range(4)])
    assert torch.allclose(rows.double(), truth_rows, atol=1e-5)

    w = ops.masked_whiten(x, mask)
    n = m.sum()
    if n > 1:
        mu = _truth_mean(x, m)
        var = (((x.double() - mu) ** 2) * m).sum() / (n - 1)
        truth = (x.double() - mu) / torch.sqrt(var + 1e-8) * m
        assert (w.double() - truth).abs().max() < 1e-5
        counted = w.double()[m > 0]
        assert abs(counted.mean().item()) < 1e-5 and abs(counted.std().item() - 1) < 1e-4
    assert (w[m == 0] == 0).all() and torch.isfinite(w).all()
    unshifted = ops.masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(unshifted, (w + float(ops.masked_mean(x, mask))) * m.float(), atol=1e-5)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("S", [1, 2, 7])
def test_group_normalize(scale, S):
    r = torch.randn(5, S) * 2
    a = ops.group_normalize(r, eps=1e-6, scale=scale)
    centered = r.double() - r.double().mean(-1, keepdim=True)
    if scale:
        std = r.double().std(-1, keepdim=True) if S > 1 else torch.zeros(5, 1, dtype=torch.float64)
        truth = centered / (std + 1e-6)
    else:
        truth = centered
    # float32's rounding of a group's mean (~1e-7 of its largest |r|) is divided by the group's std
    size = r.double().abs().amax(-1, keepdim=True) / (std + 1e-6) if scale else torch.ones(5, 1, dtype=torch.float64)
    assert a.shape == r.shape and ((a.double() - truth).abs() <= 1e-4 + 1e-6 * size).all()
    if S == 1:
        assert torch.equal(a, torch.zeros_like(a))


def test_group_normalize_identical_rewards_give_zero_not_nan():
    a = ops.group_normalize(torch.ones(3, 4))
    assert torch.equal(a, torch.zeros(3, 4))


def test_gradients_flow_through_the_stats():
    x = torch.randn(3, 8, requires_grad=True)
    mask = make_mask("random", (3, 8))
    (ops.masked_mean(x, mask) + ops.masked_whiten(x, mask).pow(2).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()


def test_validation_errors_name_the_argument():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="mask: expected a shape broadcastable to \\(4, 6\\)"):
        ops.masked_mean(x, torch.ones(4, 5))
    with pytest.raises(ValueError, match="mask: expected a shape that broadcasts to \\(4, 6\\)"):
        ops.masked_mean(x, torch.ones(2, 4, 6))
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.masked_whiten(x.long())
    with pytest.raises(ValueError, match="dim"):
        ops.masked_mean(x, dim=2)
    with pytest.raises(ValueError, match="eps"):
        ops.masked_whiten(x, eps=-1.0)
    with pytest.raises(ValueError, match="rewards: expected at least one sample"):
        ops.group_normalize(torch.randn(3, 0))
    with pytest.raises(TypeError, match="rewards: expected a torch.Tensor"):
        ops.group_normalize([1.0, 2.0])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(3, 8)
    mask = make_mask("random", (3, 8))
    r = torch.randn(4, 5)

    def f(x, m, r):
        return ops.masked_mean(x, m) + ops.masked_whiten(x, m).sum() + ops.group_normalize(r).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, mask, r)
    assert torch.allclose(out, f(x, mask, r), atol=1e-5)
