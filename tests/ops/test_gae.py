"""gae on every backend, against a float64 Python loop over the compacted (unmasked) sequence."""
import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import SignalCheckError, available_backends, check_mode, use_backend

from ._oracle import break_kernel
from .test_ppo import make_mask

GAE_BACKENDS = available_backends("gae_fwd")
FAST = [b for b in GAE_BACKENDS if b != "reference"]
MASKS = ["none", "random", "left", "right", "spans", "all-masked"]


def gae_truth(rewards, values, mask=None, gamma=0.99, lam=0.95, last_values=None):
    """The definition, literally: per row drop masked positions, run GAE in float64, scatter back."""
    T = rewards.shape[-1]
    r = rewards.detach().double().reshape(-1, T)
    v = values.detach().double().reshape(-1, T)
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.reshape(-1, T) != 0
    last = torch.zeros(r.shape[0], dtype=torch.float64) if last_values is None else last_values.double().reshape(-1)
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        idx = m[b].nonzero().flatten().tolist()
        next_v, next_a = float(last[b]), 0.0
        for t in reversed(idx):
            delta = float(r[b, t]) + gamma * next_v - float(v[b, t])
            next_a = delta + gamma * lam * next_a
            next_v = float(v[b, t])
            adv[b, t] = next_a
    ret = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv.reshape(rewards.shape), ret.reshape(rewards.shape)


def _close(got, truth, tol):
    assert got.dtype == torch.float32 and got.shape == truth.shape
    err = (got.double() - truth).abs().max().item()
    scale = max(truth.abs().max().item(), 1.0)
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.1e} × {scale:.2f}"


def _inputs(shape, dtype=torch.float32, with_last=True):
    rewards = torch.randn(shape).to(dtype)
    values = torch.randn(shape).to(dtype)
    last = torch.randn(shape[:-1]) if with_last else None
    return rewards, values, last


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("with_last", [True, False], ids=["last_values", "no-last"])
def test_gae_matches_the_definition(backend, mask_kind, with_last):
    shape = (5, 37)  # interpreter tiles are 32 long: every row crosses a T-block boundary
    rewards, values, last = _inputs(shape, with_last=with_last)
    mask = make_mask(mask_kind, shape)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.97, lam=0.9, last_values=last)
    adv_t, ret_t = gae_truth(rewards, values, mask, 0.97, 0.9, last)
    _close(adv, adv_t, 1e-5)
    _close(ret, ret_t, 1e-5)
    if mask is not None:
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize(
    "shape,gamma,lam",
    [((1, 1), 0.99, 0.95), ((3, 1), 1.0, 1.0), ((2, 3, 17), 0.99, 0.0), ((40,), 1.0, 0.95), ((7, 65), 0.5, 1.0)],
    ids=["T1", "B3T1-undiscounted", "3d-td0", "1d", "B7T65"],
)
def test_gae_shapes_and_coefficients(backend, shape, gamma, lam):
    rewards, values, last = _inputs(shape)
    mask = make_mask("random", shape)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last)
    adv_t, ret_t = gae_truth(rewards, values, mask, gamma, lam, last)
    _close(adv, adv_t, 1e-5)
    _close(ret, ret_t, 1e-5)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_bfloat16_inputs(backend):
    rewards, values, last = _inputs((4, 45), torch.bfloat16)
    mask = make_mask("spans", (4, 45))
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, last_values=last)
    adv_t, ret_t = gae_truth(rewards, values, mask, last_values=last)  # exact bf16 inputs, float64 math
    _close(adv, adv_t, 1e-5)
    _close(ret, ret_t, 1e-5)


@pytest.mark.skipif("triton" not in FAST, reason="no Triton backend here")
@pytest.mark.parametrize("block_r,block_t", [(1, 16), (2, 16), (4, 8), (8, 64), (2, 4)])
def test_triton_tiles_and_carry(block_r, block_t):
    """B=5 rows (not a multiple of the row tile), T=37 over several T-blocks: the carry between blocks."""
    from signalrl.kernels.gae import gae_fwd

    rewards, values, last = _inputs((5, 37))
    mask = make_mask("random", (5, 37))
    mask[1] = False
    mask[2, 16:] = False  # the row ends before the last block
    mask[3, :21] = False
    adv, ret = gae_fwd(rewards, values, mask.float(), last, 0.99, 0.95, _block_r=block_r, _block_t=block_t)
    adv_t, ret_t = gae_truth(rewards, values, mask, 0.99, 0.95, last)
    _close(adv, adv_t, 1e-5)
    _close(ret, ret_t, 1e-5)


@pytest.mark.skipif("triton" not in FAST, reason="no Triton backend here")
def test_triton_scan_combine_order_is_not_symmetric():
    """Deterministic rows whose coefficients vary along T (masked positions pass through with c = 1,
    valid ones decay with c = γλ): the swapped combine (c1·c2, d1 + c1·d2) gives other values.
    With constant c both orders agree, so such a row would not be a test."""
    from signalrl.kernels.gae import gae_fwd

    T = 33
    rewards = torch.zeros(2, T)
    rewards[:, -1] = 1.0
    rewards[:, 5] = -2.0
    rewards[1, 17] = 3.0
    values = torch.zeros(2, T)
    mask = torch.ones(2, T)
    mask[:, 3::4] = 0.0
    mask[1, 20:26] = 0.0
    adv, _ = gae_fwd(rewards, values, mask, torch.zeros(2), 1.0, 0.5, _block_r=2, _block_t=8)
    adv_t, _ = gae_truth(rewards, values, mask, 1.0, 0.5)
    _close(adv, adv_t, 1e-6)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_reference_agrees_and_no_gradient(backend):
    rewards, values, last = _inputs((3, 20))
    values.requires_grad_()
    mask = make_mask("left", (3, 20))
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, last_values=last)
    assert not adv.requires_grad and not ret.requires_grad
    adv_r, ret_r = reference.gae(rewards, values, mask, last_values=last)
    # float32 scans in different orders: held to 1e-5 of the largest magnitude (|A| reaches ~15 over 20 steps)
    tol = 1e-5 * max(1.0, adv_r.abs().max().item(), ret_r.abs().max().item())
    assert (adv - adv_r).abs().max() < tol and (ret - ret_r).abs().max() < tol


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_nan_stays_in_its_row_and_masked_nan_is_ignored(backend):
    rewards, values, _ = _inputs((3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    rewards[0, 6] = float("nan")  # valid: poisons positions ≤ 6 of row 0
    mask[1, 4] = False
    rewards[1, 4] = float("nan")  # masked: ignored
    values[1, 4] = float("nan")
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask)
    assert torch.isnan(adv[0, :7]).all() and not torch.isnan(adv[0, 7:]).any()
    assert not torch.isnan(adv[1:]).any() and not torch.isnan(ret[1:]).any()
    adv_t, _ = gae_truth(rewards, values, mask)
    _close(adv[1:], adv_t[1:], 1e-5)


@pytest.mark.parametrize("backend", FAST or ["none"])
def test_check_mode_passes_and_catches_a_wrong_kernel(backend, monkeypatch):
    if backend == "none":
        pytest.skip("no fast backend on this machine")
    rewards, values, last = _inputs((3, 20))
    mask = make_mask("random", (3, 20))
    with use_backend(backend), check_mode():
        ops.gae(rewards, values, mask, last_values=last)

    import importlib

    mod = importlib.import_module("signalrl.ops.gae")
    break_kernel(monkeypatch, mod.GAE_FWD, lambda args, out: (out[0] * 1.001, out[1]))
    with use_backend(backend), check_mode(), pytest.raises(SignalCheckError, match="max abs error"):
        ops.gae(rewards, values, mask, last_values=last)


def test_validation_errors_name_the_argument():
    r = torch.randn(4, 6)
    with pytest.raises(ValueError, match="values: expected shape \\(4, 6\\)"):
        ops.gae(r, torch.randn(4, 5))
    with pytest.raises(ValueError, match="last_values: expected shape \\(4,\\)"):
        ops.gae(r, r, last_values=torch.randn(4, 1))
    with pytest.raises(ValueError, match="gamma"):
        ops.gae(r, r, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        ops.gae(r, r, lam=-0.1)
    with pytest.raises(TypeError, match="rewards: expected dtype"):
        ops.gae(r.long(), r)
    with pytest.raises(ValueError, match="mask: expected shape"):
        ops.gae(r, r, torch.ones(4, 7))


def test_float64_runs_the_reference():
    r = torch.randn(2, 5, dtype=torch.float64)
    adv, ret = ops.gae(r, r)
    assert adv.dtype == torch.float64


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    rewards, values, last = _inputs((3, 12))
    mask = make_mask("random", (3, 12))

    def f(r, v, m, lv):
        adv, ret = ops.gae(r, v, m, gamma=0.9, lam=0.8, last_values=lv)
        return adv * 2 + ret

    with use_backend(backend):
        eager = f(rewards, values, mask, last)
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(rewards, values, mask, last)
    assert torch.allclose(out, eager, atol=1e-6)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.uint8])
def test_gae_mask_dtypes_mean_nonzero(backend, mask_dtype):
    rewards, values, last = _inputs((3, 21))
    # 0, 1, 2: nonzero counts, like the reference's mask.bool() (a negative weight is an error: tests/ops/test_errors.py)
    codes = torch.randint(0, 3, (3, 21))
    mask = (codes != 0) if mask_dtype == torch.bool else codes.to(mask_dtype)
    with use_backend(backend):
        adv, ret = ops.gae(rewards, values, mask, last_values=last)
    adv_t, ret_t = gae_truth(rewards, values, codes != 0, last_values=last)
    _close(adv, adv_t, 1e-5)
    _close(ret, ret_t, 1e-5)
