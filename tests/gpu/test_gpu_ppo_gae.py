"""GPU-only: big-shape fidelity of the Triton PPO epilogue, value loss, KL and GAE kernels.

- GAE: B = 70 000 rows (> the 65 535 limit of grid axes 1/2), T = 32 768 (many T-blocks and carries),
  B = 1024 × T = 8192 (the benchmark shape), and B·T > 2³¹ (int64 offsets) when the GPU has the memory;
  against the reference loop (float64) on the same device or float64 truth on the CPU for sampled rows.
- PPO / value loss / KL: ~4M tokens, every aggregation, dual-clip, bf16 and fp32, against float64 on the GPU.
- torch.compile(fullgraph=True) with the default (inductor) backend over each public op.

Each check is a plain function of (device, sizes) so the same code can be exercised on the CPU with tiny
shapes; the pytest entry points below run them on CUDA only.
"""
import pytest
import torch

from signalrl import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(got, truth):
    g, t = got.double(), truth.double()
    assert torch.isfinite(g).all(), "non-finite values"
    return ((g - t).norm() / t.norm().clamp_min(1e-300)).item()


def _mask(B, T, device, gen):
    """Right padding, left padding and masked spans, by row."""
    pos = torch.arange(T, device=device).expand(B, T)
    lengths = torch.randint(0, T + 1, (B, 1), device=device, generator=gen)
    kind = torch.arange(B, device=device)[:, None] % 3
    right = pos < lengths
    left = pos >= (T - lengths)
    a = torch.randint(0, T, (B, 1), device=device, generator=gen)
    span = ~((pos >= a) & (pos < a + T // 4))
    return torch.where(kind == 0, right, torch.where(kind == 1, left, span))


# --- GAE ------------------------------------------------------------------------------------


def check_gae_against_reference(device, B, T, dtype=torch.float32, seed=0):
    import signalrl.ops as ops

    gen = torch.Generator(device=device).manual_seed(seed)
    r = torch.randn(B, T, device=device, generator=gen).to(dtype)
    v = torch.randn(B, T, device=device, generator=gen).to(dtype)
    m = _mask(B, T, device, gen)
    last = torch.randn(B, device=device, generator=gen)
    with ops.use_backend("triton"):
        adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.95, last_values=last)
    # the reference loop launches ~10 kernels per step on a GPU: on the CPU in float64 it is quicker
    adv_t, ret_t = reference.gae(r.cpu().double(), v.cpu().double(), m.cpu(), gamma=0.99, lam=0.95,
                                 last_values=last.cpu().double())
    assert adv.dtype == torch.float32 and adv.shape == (B, T)
    assert _rel(adv.cpu(), adv_t) < 1e-5 and _rel(ret.cpu(), ret_t) < 1e-5
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def check_gae_sampled_rows(device, B, T, rows, dtype=torch.bfloat16, seed=0):
    """Run the kernel on a [B, T] problem; check the given rows against float64 truth on the CPU."""
    from signalrl.kernels.gae import gae_fwd

    gen = torch.Generator(device=device).manual_seed(seed)
    r = torch.empty(B, T, device=device, dtype=dtype).normal_(generator=gen)
    v = torch.empty(B, T, device=device, dtype=dtype).normal_(generator=gen)
    m = torch.randint(0, 5, (B, T), device=device, generator=gen, dtype=torch.uint8).clamp_(max=1)  # 80 % valid
    last = torch.randn(B, device=device, generator=gen)
    adv, ret = gae_fwd(r, v, m, last, 0.999, 0.97)
    idx = torch.tensor(rows, device=device)
    sel = lambda x: x.index_select(0, idx).cpu()  # noqa: E731
    adv_t, ret_t = reference.gae(sel(r).double(), sel(v).double(), sel(m).bool(), gamma=0.999, lam=0.97,
                                 last_values=sel(last).double())
    assert _rel(sel(adv), adv_t) < 1e-5 and _rel(sel(ret), ret_t) < 1e-5


@pytest.mark.parametrize("B,T", [(70_000, 64), (1024, 8192), (3, 32768), (65_535, 300)],
                         ids=["B70000-T64", "B1024-T8192", "B3-T32768", "B65535-T300"])
def test_gae_big_shapes(B, T):
    check_gae_against_reference("cuda", B, T)


def test_gae_long_rows_bf16_against_cpu_truth():
    check_gae_sampled_rows("cuda", 64, 32768, rows=[0, 1, 37, 63])


def test_gae_beyond_int32_offsets():
    B, T = 65_600, 32_768  # B·T = 2 149 580 800 > 2^31
    need = B * T * (2 + 2 + 1 + 4 + 4) + (2 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB available")
    check_gae_sampled_rows("cuda", B, T, rows=[0, 1, B // 2, B - 2, B - 1])


# --- PPO epilogue, value loss, KL ------------------------------------------------------------


def check_surrogate(device, B, T, dtype, aggregation, dual_clip, seed=0):
    import signalrl.ops as ops

    gen = torch.Generator(device=device).manual_seed(seed)
    lp = (torch.rand(B, T, device=device, generator=gen) * -4).to(dtype)
    old = (lp.float() + 0.3 * torch.randn(B, T, device=device, generator=gen)).to(dtype)
    adv = torch.randn(B, T, device=device, generator=gen)
    m = _mask(B, T, device, gen)
    x = lp.clone().requires_grad_()
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, aggregation=aggregation)
    with ops.use_backend("triton"):
        loss, stats = ops.clipped_surrogate(x, old, adv, m, **kw)
    loss.backward()
    xt = lp.double().requires_grad_()
    loss_t, stats_t = reference.clipped_surrogate(xt, old.double(), adv.double(), m, **kw)
    loss_t.backward()
    scale = reference.aggregate(adv.double().abs() * torch.exp(lp.double() - old.double()).clamp_min(1.3), m,
                                aggregation)
    assert abs(loss.item() - loss_t.item()) <= 1e-5 * scale.item()
    assert _rel(x.grad, xt.grad) < (1e-5 if dtype == torch.float32 else 2.0**-8)  # bf16 grads are rounded to bf16
    for k, t in stats_t.items():
        tol = 1e-6 if k.endswith("fraction") else 1e-5 * max(1.0, abs(t.item()))
        assert abs(stats[k].item() - t.item()) <= tol, (k, stats[k].item(), t.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", list(reference.AGGREGATIONS))
def test_clipped_surrogate_big(dtype, aggregation):
    check_surrogate("cuda", 512, 8192, dtype, aggregation, dual_clip=3.0 if dtype == torch.float32 else None)


def check_ppo_token_kernel_with_kl_entropy(device, N, estimator, seed=0):
    from signalrl.kernels import ppo as K

    gen = torch.Generator(device=device).manual_seed(seed)
    lp = torch.rand(N, device=device, generator=gen) * -4
    old = lp + 0.3 * torch.randn(N, device=device, generator=gen)
    ref = lp + 0.3 * torch.randn(N, device=device, generator=gen)
    adv = torch.randn(N, device=device, generator=gen)
    ent = torch.rand(N, device=device, generator=gen) * 3
    m = (torch.rand(N, device=device, generator=gen) > 0.1).float()
    w = m / m.sum()
    loss, g_lp, g_ent, stats = K.ppo_token_fwd(lp, old, adv, w, m, ref, ent, 0.2, 0.2, 2.0, estimator, 0.1, 0.01)
    xt = lp.double().requires_grad_()
    pg, st = reference.clipped_surrogate(xt, old.double(), adv.double(), m.double(), dual_clip=2.0)
    kl = reference.kl_penalty(xt, ref.double(), estimator)
    total = pg + 0.1 * reference.aggregate(kl, m.double()) - 0.01 * reference.aggregate(ent.double(), m.double())
    total.backward()
    assert abs(loss.item() - total.item()) < 1e-5 * max(1.0, abs(total.item()))
    assert _rel(g_lp, xt.grad) < 1e-5
    truth = dict(st, pg_loss=pg.detach(), entropy=reference.masked_mean(ent.double(), m.double()),
                 kl=reference.masked_mean(kl.detach(), m.double()))
    for i, k in enumerate(K.PPO_STAT_KEYS):
        assert abs(stats[i].item() - truth[k].item()) <= 1e-5 * max(1.0, abs(truth[k].item())), k


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_ppo_token_kernel_big(estimator):
    check_ppo_token_kernel_with_kl_entropy("cuda", 3_000_017, estimator)


def check_value_loss(device, B, T, clip, seed=0):
    import signalrl.ops as ops

    gen = torch.Generator(device=device).manual_seed(seed)
    v = torch.randn(B, T, device=device, generator=gen) + 50.0
    old = v + 0.3 * torch.randn(B, T, device=device, generator=gen)
    ret = v + torch.randn(B, T, device=device, generator=gen)
    m = _mask(B, T, device, gen)
    x = v.clone().requires_grad_()
    with ops.use_backend("triton"):
        loss, stats = ops.value_loss(x, old, ret, m, clip=clip)
    loss.backward()
    xt = v.double().requires_grad_()
    loss_t, st = reference.value_loss(xt, old.double(), ret.double(), m, clip=clip)
    loss_t.backward()
    assert abs(loss.item() - loss_t.item()) < 1e-4 * loss_t.item()
    # Near a tie of the two squared errors the branch the max takes depends on how v_c = old + clip(v - old) rounds
    # (about 4e-6 at |v| ~ 50 in float32), and the gradient jumps between (v - R)/n and 0 there: a few elements of
    # millions, which alone give a relative error of ~1e-3. Those are compared by count, the rest value by value.
    keep = torch.ones_like(v, dtype=torch.bool)
    if clip is not None:
        vd, od, rd = v.double(), old.double(), ret.double()
        vc = od + (vd - od).clamp(-clip, clip)
        # |Δ(v_c − R)²| ≤ 2·|v_c − R|·half an ulp at 50 (1.9e-6); twice that, and both sides' magnitudes
        tie = ((vd - od).abs() > clip) & (((vd - rd) ** 2 - (vc - rd) ** 2).abs()
                                          <= 8e-6 * ((vd - rd).abs() + (vc - rd).abs()))
        assert tie.sum().item() <= 1e-4 * v.numel()
        keep = ~tie
    assert _rel(x.grad[keep], xt.grad[keep]) < 1e-5
    assert abs(stats["explained_variance"].item() - st["explained_variance"].item()) < 1e-4
    # each tie may count on either side of the clip
    flips = 0 if clip is None else tie.sum().item() / max(1.0, float(m.sum().item()))
    assert abs(stats["value_clip_fraction"].item() - st["value_clip_fraction"].item()) <= flips + 1e-6
    assert abs(stats["return_mean"].item() - st["return_mean"].item()) < 1e-4


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_big(clip):
    check_value_loss("cuda", 512, 8192, clip)


def test_kl_penalty_big():
    import signalrl.ops as ops

    lp = torch.rand(4096, 1031, device="cuda") * -4
    ref = lp + 0.5 * torch.randn_like(lp)
    for est in reference.KL_ESTIMATORS:
        x = lp.clone().requires_grad_()
        with ops.use_backend("triton"):
            kl = ops.kl_penalty(x, ref, est)
        kl.sum().backward()
        xt = lp.double().requires_grad_()
        kl_t = reference.kl_penalty(xt, ref.double(), est)
        kl_t.sum().backward()
        assert _rel(kl, kl_t) < 1e-5 and _rel(x.grad, xt.grad) < 1e-5


def test_torch_compile_inductor_cuda():
    import signalrl.ops as ops

    torch._dynamo.reset()
    B, T = 8, 300
    lp = (torch.rand(B, T, device="cuda") * -3).requires_grad_()
    old = lp.detach() + 0.2 * torch.randn(B, T, device="cuda")
    ref = lp.detach() + 0.2 * torch.randn(B, T, device="cuda")
    adv = torch.randn(B, T, device="cuda")
    v = torch.randn(B, T, device="cuda", requires_grad=True)
    m = torch.rand(B, T, device="cuda") > 0.2

    def f(lp, v):
        adv_g, ret = ops.gae(adv, v.detach(), m, last_values=torch.zeros(B, device="cuda"))
        pg, stats = ops.clipped_surrogate(lp, old, adv_g, m, dual_clip=3.0)
        vl, vstats = ops.value_loss(v, v.detach() + 0.1, ret, m, clip=0.2)
        kl = ops.masked_mean(ops.kl_penalty(lp, ref), m)
        return pg + 0.5 * vl + 0.1 * kl, stats["clip_fraction"] + vstats["explained_variance"]

    eager, s_eager = f(lp, v)
    g_eager = torch.autograd.grad(eager, (lp, v))
    out, s = torch.compile(f, fullgraph=True)(lp, v)
    g = torch.autograd.grad(out, (lp, v))
    assert abs(out.item() - eager.item()) < 1e-5 and abs(s.item() - s_eager.item()) < 1e-5
    for a, b in zip(g, g_eager):
        assert _rel(a, b) < 1e-5
