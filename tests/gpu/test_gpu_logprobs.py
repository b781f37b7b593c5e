"""GPU-only: big-shape fidelity of the Triton log-prob kernels and peak-memory bounds of the linear ops.

- Fidelity grid: V ∈ {32000, 128256, 151936, 262144}, N up to 32768, H = 4096, bf16 — log-probs, entropy,
  d(hidden), d(weight) against float64 truth computed in row chunks (the [N, V] float64 logits never exist at once).
- Peak memory: the extra memory of linear_token_logprobs / linear_ppo_loss forward+backward (beyond inputs and the
  gradients they return) stays within the bound documented in signalrl/kernels/linear_logprobs.py.

Run with ``pytest tests -m "gpu or not gpu"`` on a CUDA machine (benchmarks/gpu_check.sh does).
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IGN = -100
H_BIG = 4096


def _report(line: str) -> None:
    """Print a measured figure and, when SIGNAL_GPU_REPORT names a file (benchmarks/gpu_check.sh sets it), append it."""
    print(line)
    path = os.environ.get("SIGNAL_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _rel(got, truth):
    g, t = got.double(), truth.double()
    assert torch.isfinite(g).all(), "non-finite values"
    return ((g - t).norm() / t.norm().clamp_min(1e-300)).item()


def _inputs(N, V, H, dtype, seed=0, ignore_frac=0.1, wscale=2.0, bias=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) * (wscale / H**0.5)).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[torch.rand(N, device="cuda", generator=g) < ignore_frac] = IGN
    b = torch.randn(V, device="cuda", generator=g).to(dtype) if bias else None
    return h, w, b, t


@torch.no_grad()
def _truth_linear(h, w, b, t, g_lp, g_h, T=1.0, rows=2048):
    """float64 log-probs, entropy and gradients (of Σ g_lp·logp + g_h·H) in row chunks."""
    N, H = h.shape
    V = w.shape[0]
    w64 = w.double()
    b64 = b.double() if b is not None else None
    lp = torch.zeros(N, dtype=torch.float64, device="cuda")
    ent = torch.zeros_like(lp)
    dh = torch.zeros(N, H, dtype=torch.float64, device="cuda")
    dw = torch.zeros(V, H, dtype=torch.float64, device="cuda")
    db = torch.zeros(V, dtype=torch.float64, device="cuda") if b is not None else None
    for r0 in range(0, N, rows):
        r = slice(r0, min(N, r0 + rows))
        hr = h[r].double()
        z = hr @ w64.t()
        if b64 is not None:
            z += b64
        z /= T
        logp = torch.log_softmax(z, -1)
        del z
        tr = t[r]
        valid = tr != IGN
        lpr = logp.gather(1, tr.clamp_min(0)[:, None])[:, 0]
        p = logp.exp()
        er = -(p * logp).sum(-1)
        lp[r] = torch.where(valid, lpr, 0.0)
        ent[r] = torch.where(valid, er, 0.0)
        gl = torch.where(valid, g_lp[r].double(), 0.0)
        gh = torch.where(valid, g_h[r].double(), 0.0)
        # G = g_lp (δ − p) − g_H p (log p + H), then / T
        logp += er[:, None]
        logp *= p
        logp *= -gh[:, None]
        p *= -gl[:, None]
        p += logp
        del logp
        p[torch.arange(p.shape[0], device="cuda")[valid], tr[valid]] += gl[valid]
        p /= T
        dh[r] = p @ w64
        dw += p.t() @ hr
        if db is not None:
            db += p.sum(0)
        del p
    return lp, ent, dh, dw, db


GRID = [(8192, 32000), (8192, 128256), (8192, 151936), (8192, 262144), (32768, 128256), (32768, 262144)]


@pytest.mark.parametrize("N,V", GRID, ids=[f"N{n}-V{v}" for n, v in GRID])
def test_linear_token_logprobs_fidelity_bf16(N, V):
    from signalrl.kernels import linear_logprobs as LL

    h, w, b, t = _inputs(N, V, H_BIG, torch.bfloat16, seed=N + V)
    g_lp = torch.randn(N, device="cuda")
    g_h = torch.randn(N, device="cuda")
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)
    gh, gw, _ = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, None, t, lse, ent, 1.0, IGN, True, True, False)
    torch.cuda.synchronize()
    lp_t, ent_t, dh_t, dw_t, _ = _truth_linear(h, w, None, t, g_lp, g_h)
    errs = dict(logprobs=_rel(lp, lp_t), entropy=_rel(ent, ent_t), d_hidden=_rel(gh, dh_t), d_weight=_rel(gw, dw_t))
    _report(f"fidelity linear_token_logprobs N={N} V={V} H={H_BIG} bf16, relative error vs float64: "
            + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    # inputs are exact in float32, so forward values carry only float32 accumulation error
    assert errs["logprobs"] < 1e-4 and errs["entropy"] < 1e-4, errs
    # gradients: one bf16 rounding of g_z and one of the output (≈ 2^-9 each)
    assert errs["d_hidden"] < 1e-2 and errs["d_weight"] < 1e-2, errs
    assert (lp[t == IGN] == 0).all()


def test_linear_token_logprobs_fp32_matches_ieee():
    from signalrl.kernels import linear_logprobs as LL

    N, V, H = 1024, 32000, 1024
    h, w, b, t = _inputs(N, V, H, torch.float32, seed=1, bias=True)
    g_lp, g_h = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, b, t, 0.8, IGN, True)
    gh, gw, gb = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, b, t, lse, ent, 0.8, IGN, True, True, True)
    lp_t, ent_t, dh_t, dw_t, db_t = _truth_linear(h, w, b, t, g_lp, g_h, T=0.8)
    for name, got, truth in [("logprobs", lp, lp_t), ("entropy", ent, ent_t), ("d_hidden", gh, dh_t),
                             ("d_weight", gw, dw_t), ("d_bias", gb, db_t)]:
        assert _rel(got, truth) < 1e-5, (name, _rel(got, truth))


@pytest.mark.parametrize("V", [128256, 262144])
def test_token_logprobs_fidelity_bf16(V):
    from signalrl.kernels import logprobs as TL

    N = 4096
    x = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = IGN
    lp, ent, lse = TL.token_logprobs_fwd(x, t, 1.0, IGN, True)
    g_lp, g_h = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    grad = TL.token_logprobs_bwd(g_lp, g_h, x, t, lse, ent, 1.0, IGN)
    for r0 in range(0, N, 512):
        r = slice(r0, r0 + 512)
        z = x[r].double().requires_grad_()
        logp = torch.log_softmax(z, -1)
        valid = t[r] != IGN
        lpt = torch.where(valid, logp.gather(1, t[r].clamp_min(0)[:, None])[:, 0], 0.0)
        et = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
        (gt,) = torch.autograd.grad((lpt * g_lp[r].double() + et * g_h[r].double()).sum(), z)
        assert _rel(lp[r], lpt) < 1e-5 and _rel(ent[r], et) < 1e-5
        assert _rel(grad[r], gt) < 1e-2
    # in place: same bits, and no [N, V] allocation
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    TL.token_logprobs_bwd_inplace(g_lp, g_h, x, t, lse, ent, 1.0, IGN)
    assert torch.cuda.max_memory_allocated() - base < 1 << 20
    assert torch.equal(x, grad)


def _bound_bytes(N, V, H, elem, hidden_fp32=False, need_weight=True, need_bias=False):
    """The documented extra-memory bound of the linear forward + backward (signalrl/kernels/linear_logprobs.py)."""
    from signalrl.kernels import linear_logprobs as LL

    plan = LL.backward_plan(N, V, H, elem, hidden_fp32, True, need_weight, need_bias)
    _, n_split = LL._split_plan(N, V, torch.device("cuda"))
    return plan.extra_bytes + 12 * N * n_split + 64 * N


def _peak_extra(fn, keep_bytes):
    """Peak bytes allocated while ``fn`` runs, beyond what was allocated before and the ``keep_bytes`` it returns
    (the benchmarks' meter, :func:`signalrl.bench.timing.peak_memory`)."""
    from signalrl.bench.timing import peak_memory

    return peak_memory(fn, torch.device("cuda", torch.cuda.current_device())) - keep_bytes


@pytest.mark.parametrize("N", [8192, 16384])
def test_linear_token_logprobs_peak_memory(N):
    import signalrl.ops as ops

    V, H = 128256, H_BIG
    h, w, _, t = _inputs(N, V, H, torch.bfloat16, seed=3)
    h.requires_grad_()
    w.requires_grad_()

    def run():
        lp, ent = ops.linear_token_logprobs(h, w, t, return_entropy=True)
        return torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), (h, w))

    run()  # compile / autotune outside the measurement
    grads_bytes = h.numel() * 2 + w.numel() * 2
    extra = _peak_extra(run, grads_bytes)
    bound = _bound_bytes(N, V, H, 2)
    logits_fp32 = N * V * 4
    _report(f"memory linear_token_logprobs fwd+bwd N={N} V={V} H={H} bf16: extra {extra / 2**20:.1f} MiB = "
            f"{100 * extra / logits_fp32:.2f} % of the [N, V] fp32 logits (documented bound {bound / 2**20:.1f} MiB)")
    assert extra <= bound, (extra, bound)


@pytest.mark.parametrize("N,bias", [(8192, False), (16384, False), (8200, True)])
def test_linear_token_logprobs_frozen_head_peak_memory_within_one_percent(N, bias):
    """A frozen LM head (LoRA): the row-major backward keeps the extra memory within 1 % of the [N, V] float32
    logits (the issue's goal), and d hidden matches the vocab-major order's. N=8200: chunks that do not divide N,
    with a trained bias."""
    import signalrl.ops as ops

    V, H = 128256, H_BIG
    h, w, b, t = _inputs(N, V, H, torch.bfloat16, seed=4, bias=bias)
    h.requires_grad_()
    leaves = (h, b.requires_grad_()) if bias else (h,)

    def run():
        lp, ent = ops.linear_token_logprobs(h, w, t, bias=b, return_entropy=True)
        return torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), leaves)

    gh = run()[0]
    extra = _peak_extra(run, h.numel() * 2 + (b.numel() * 2 if bias else 0))
    bound = _bound_bytes(N, V, H, 2, need_weight=False, need_bias=bias)
    logits_fp32 = N * V * 4
    _report(f"memory linear_token_logprobs fwd+bwd, frozen head, N={N} V={V} H={H} bf16: extra "
            f"{extra / 2**20:.1f} MiB = {100 * extra / logits_fp32:.2f} % of the [N, V] fp32 logits "
            f"(documented bound {bound / 2**20:.1f} MiB)")
    assert extra <= bound, (extra, bound)
    assert extra <= 0.01 * logits_fp32 + (1 << 20), extra
    w2 = w.detach().clone().requires_grad_()
    lp, ent = ops.linear_token_logprobs(h, w2, t, bias=b, return_entropy=True)
    gh_v, _ = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), (h, w2))
    assert _rel(gh, gh_v) < 1e-2


def test_linear_ppo_loss_peak_memory_and_values():
    import signalrl.ops as ops
    from signalrl import reference

    B, T, V, H = 8, 1024, 128256, H_BIG
    N = B * T
    h, w, _, t = _inputs(N, V, H, torch.bfloat16, seed=5)
    h = h.reshape(B, T, H).requires_grad_()
    w.requires_grad_()
    t = t.reshape(B, T)
    with torch.no_grad():
        lp0 = ops.linear_token_logprobs(h, w, t)
    old = lp0 + 0.2 * torch.randn_like(lp0)
    ref = lp0 + 0.2 * torch.randn_like(lp0)
    adv = torch.randn_like(lp0)
    mask = (torch.rand_like(lp0) > 0.1).float()
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0)

    def fused():
        loss, stats = ops.linear_ppo_loss(h, w, t, old, adv, mask, **kw)
        return (loss, stats) + torch.autograd.grad(loss, (h, w))

    loss, stats, gh, gw = fused()
    extra = _peak_extra(fused, h.numel() * 2 + w.numel() * 2)
    bound = _bound_bytes(N, V, H, 2)
    _report(f"memory linear_ppo_loss fwd+bwd N={N} V={V} H={H} bf16: extra {extra / 2**20:.1f} MiB = "
            f"{100 * extra / (N * V * 4):.2f} % of the [N, V] fp32 logits (documented bound {bound / 2**20:.1f} MiB)")
    assert extra <= bound, (extra, bound)

    # values against the reference composition in float32 on a slice of rows (the reference materializes [N, V])
    rows = 2
    hs = h[:rows].detach().float().requires_grad_()
    ws = w.detach().float().requires_grad_()
    kw_s = dict(kw, ref_logprobs=ref[:rows])
    loss_s, stats_s = ops.linear_ppo_loss(h[:rows], w, t[:rows], old[:rows], adv[:rows], mask[:rows], **kw_s)
    loss_r, stats_r = reference.linear_ppo_loss(hs, ws, t[:rows], old[:rows], adv[:rows], mask[:rows], **kw_s)
    assert abs(loss_s.item() - loss_r.item()) <= 1e-3 * max(1.0, abs(loss_r.item()))
    for k in stats_r:
        assert abs(stats_s[k].item() - stats_r[k].item()) <= 2e-3 * max(1.0, abs(stats_r[k].item())), k
