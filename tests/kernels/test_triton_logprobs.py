"""Triton log-prob kernels called directly (families ``logprobs`` and ``linear_logprobs``) against float64 truth.

Runs on CUDA when present, else in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported; the module-level setdefault below does the same if this file is run without that conftest).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from signalrl.kernels import linear_logprobs as LL  # noqa: E402
from signalrl.kernels import logprobs as TL  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on masked lanes

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IGN = -100
_ROUND = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rel(got, truth):
    g, t = got.detach().double().cpu(), truth.detach().double().cpu()
    assert g.shape == t.shape
    if not torch.isfinite(g).all():
        return float("inf")
    d = t.norm().item()
    return (g - t).norm().item() / d if d > 0 else (g - t).norm().item()


def check(what, got, truth, dtype, baseline=None, atol=0.0):
    if atol and (got.detach().double().cpu() - truth.detach().double().cpu()).abs().max().item() <= atol:
        return  # values that are ~0 in truth (e.g. entropy of a one-hot softmax): absolute error is the measure
    err = rel(got, truth)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    if baseline is not None and dtype in _ROUND:
        bound = max(2 * rel(baseline, truth), _ROUND[dtype])
        assert err <= bound, f"{what}: {err:.3e} worse than same-dtype PyTorch ({bound:.3e})"


def targets_for(n, V, frac=0.2):
    t = torch.randint(0, V, (n,))
    t[torch.rand(n) < frac] = IGN
    return t.to(DEV)


def truth_logprobs(logits64, t, T):
    """(logp, entropy) in float64 from float64 logits (graph kept for autograd)."""
    ls = torch.log_softmax(logits64 / T, -1)
    valid = t != IGN
    lp = torch.where(valid, ls.gather(-1, t.clamp_min(0)[:, None])[:, 0], 0.0)
    p = ls.exp()
    ent = torch.where(valid, -torch.where(p > 0, p * ls, 0.0).sum(-1), 0.0)
    return lp, ent


# ------------------------------------------------------------------------------------------- token_logprobs (logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "N,V,T,scale",
    [(37, 1000, 1.0, 3.0), (37, 1031, 0.7, 3.0), (1, 1031, 1.0, 3.0), (5, 9000, 1.3, 4.0), (6, 1000, 1.0, 1e4)],
    ids=["N37-V1000", "N37-V1031-temp", "N1", "V9000-multiblock", "huge-logits"],
)
def test_token_logprobs_fwd_bwd(dtype, N, V, T, scale):
    x = (torch.randn(N, V, device=DEV) * scale).to(dtype)
    t = targets_for(N, V)
    lp, ent, lse = TL.token_logprobs_fwd(x, t, T, IGN, True)
    assert lp.dtype == ent.dtype == torch.float32 and lse.dtype == torch.float64 and lp.shape == (N,)
    x64 = x.double().requires_grad_()
    lp_t, ent_t = truth_logprobs(x64, t, T)
    # same-dtype PyTorch baseline
    xb = x.clone().requires_grad_()
    lp_b, ent_b = truth_logprobs(xb, t, T)
    check("logprobs", lp, lp_t, dtype, lp_b)
    check("entropy", ent, ent_t, dtype, atol=1e-5)
    valid = t != IGN
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()
    assert torch.isfinite(lse).all()
    lp2, ent2, lse2 = TL.token_logprobs_fwd(x, t, T, IGN, False)
    assert ent2.numel() == 0 and torch.equal(lp2, lp) and torch.equal(lse2, lse)

    g_lp, g_h = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    grad = TL.token_logprobs_bwd(g_lp, g_h, x, t, lse, ent, T, IGN)
    assert grad.dtype == dtype and grad.shape == x.shape
    (gt,) = torch.autograd.grad((lp_t * g_lp.double() + ent_t * g_h.double()).sum(), x64, retain_graph=True)
    (gb,) = torch.autograd.grad((lp_b * g_lp + ent_b * g_h).sum(), xb)
    check("d logits", grad, gt, dtype, gb)
    assert (grad[~valid] == 0).all()

    # log-prob only (empty grad_entropy) and the in-place variant (bit-identical to out-of-place)
    grad_lp = TL.token_logprobs_bwd(g_lp, torch.empty(0, device=DEV), x, t, lse, torch.empty(0, device=DEV), T, IGN)
    (gt_lp,) = torch.autograd.grad((lp_t * g_lp.double()).sum(), x64)
    check("d logits (logprob only)", grad_lp, gt_lp, dtype)
    xi = x.clone()
    assert TL.token_logprobs_bwd_inplace(g_lp, g_h, xi, t, lse, ent, T, IGN) is None
    assert torch.equal(xi, grad)


def test_token_logprobs_all_ignored_and_bad_target():
    N, V = 4, 300
    x = torch.randn(N, V, device=DEV)
    t = torch.full((N,), IGN, device=DEV)
    lp, ent, lse = TL.token_logprobs_fwd(x, t, 1.0, IGN, True)
    assert (lp == 0).all() and (ent == 0).all()
    g = TL.token_logprobs_bwd(torch.ones(N, device=DEV), torch.ones(N, device=DEV), x, t, lse, ent, 1.0, IGN)
    assert (g == 0).all()
    # an out-of-range target that is not ignore_index is reported as NaN, never a silent number
    t2 = torch.tensor([0, V, -1, IGN], device=DEV)
    lp2, _, _ = TL.token_logprobs_fwd(x, t2, 1.0, IGN, False)
    assert torch.isfinite(lp2[0]) and torch.isnan(lp2[1]) and torch.isnan(lp2[2]) and lp2[3] == 0


def test_token_logprobs_true_class_gradient_no_cancellation():
    """p(target) ≈ 0.98: d/dz_t = g·(1 − p_t) ≈ 0.02; forming (1 − p) after rounding p to bf16 (steps of 2^-8 near 1)
    would be off by up to ~20 % (Liger PR #1419); float32 (δ − p) keeps it to float32 rounding."""
    N, V = 8, 2000
    x = torch.randn(N, V, device=DEV)
    t = torch.randint(0, V, (N,), device=DEV)
    x[torch.arange(N, device=DEV), t] = 12.0
    x = x.to(torch.bfloat16)
    lp, ent, lse = TL.token_logprobs_fwd(x, t, 1.0, IGN, False)
    g = TL.token_logprobs_bwd(torch.ones(N, device=DEV), torch.empty(0, device=DEV), x, t, lse,
                              torch.empty(0, device=DEV), 1.0, IGN)
    x64 = x.double()
    truth = 1.0 - torch.softmax(x64, -1)[torch.arange(N, device=DEV), t]
    got = g[torch.arange(N, device=DEV), t].double()
    assert (truth > 0).all()
    assert ((got - truth).abs() / truth).max() < 2**-7


def test_token_logprobs_fp16_and_strided_rows():
    N, V = 9, 777
    base = torch.randn(N, V + 5, device=DEV).to(torch.float16)
    x = base[:, :V]  # rows with a stride larger than V
    t = targets_for(N, V)
    lp, ent, lse = TL.token_logprobs_fwd(x, t, 1.0, IGN, True)
    lp_t, ent_t = truth_logprobs(x.double(), t, 1.0)
    check("logprobs fp16", lp, lp_t, torch.float16)
    check("entropy fp16", ent, ent_t, torch.float16)


# ----------------------------------------------------------------------------------- linear_token_logprobs (hidden)


def _linear_inputs(N, V, H, dtype, bias, wscale=2.0):
    h = torch.randn(N, H, device=DEV).to(dtype)
    w = (torch.randn(V, H, device=DEV) * (wscale / H**0.5)).to(dtype)
    b = torch.randn(V, device=DEV).to(dtype) if bias else None
    return h, w, b


def _linear_truth(h, w, b, t, T, dt=torch.float64):
    h_ = h.to(dt).requires_grad_()
    w_ = w.to(dt).requires_grad_()
    b_ = b.to(dt).requires_grad_() if b is not None else None
    logits = h_ @ w_.t() + (b_ if b_ is not None else 0)
    lp, ent = truth_logprobs(logits, t, T)
    return (h_, w_, b_), lp, ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "N,V,H,T,bias",
    [(37, 1031, 48, 1.0, True), (37, 1000, 48, 0.7, False), (1, 1031, 48, 1.0, True), (20, 200, 40, 1.0, False)],
    ids=["N37-V1031-bias", "N37-V1000-temp", "N1", "small"],
)
def test_linear_token_logprobs_fwd_bwd(dtype, N, V, H, T, bias):
    h, w, b = _linear_inputs(N, V, H, dtype, bias)
    t = targets_for(N, V)
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, b, t, T, IGN, True)
    assert lp.dtype == ent.dtype == torch.float32 and lse.dtype == torch.float64
    leaves, lp_t, ent_t = _linear_truth(h, w, b, t, T)
    leaves_b, lp_b, ent_b = _linear_truth(h, w, b, t, T, dt=dtype)  # same-dtype PyTorch baseline
    check("logprobs", lp, lp_t, dtype, lp_b)
    check("entropy", ent, ent_t, dtype)
    valid = t != IGN
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()
    lp2, e2, _ = LL.linear_token_logprobs_fwd(h, w, b, t, T, IGN, False)
    assert e2.numel() == 0 and rel(lp2, lp) < 1e-6

    g_lp, g_h = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    gh, gw, gb = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, b, t, lse, ent, T, IGN, True, True, bias)
    assert gh.dtype == dtype and gw.dtype == dtype and gh.shape == h.shape and gw.shape == w.shape
    obj = (lp_t * g_lp.double() + ent_t * g_h.double()).sum()
    truth = torch.autograd.grad(obj, [x for x in leaves if x is not None])
    obj_b = (lp_b * g_lp.to(dtype) + ent_b * g_h.to(dtype)).sum()
    base = torch.autograd.grad(obj_b, [x for x in leaves_b if x is not None])
    check("d hidden", gh, truth[0], dtype, base[0])
    check("d weight", gw, truth[1], dtype, base[1])
    if bias:
        assert gb.dtype == dtype
        check("d bias", gb, truth[2], dtype, base[2])
    else:
        assert gb.numel() == 0


def test_linear_token_logprobs_partial_needs_and_no_entropy():
    N, V, H = 19, 600, 32
    h, w, b = _linear_inputs(N, V, H, torch.float32, True)
    t = targets_for(N, V)
    lp, _, lse = LL.linear_token_logprobs_fwd(h, w, b, t, 1.0, IGN, False)
    e = torch.empty(0, device=DEV)
    g_lp = torch.randn(N, device=DEV)
    leaves, lp_t, _ = _linear_truth(h, w, b, t, 1.0)
    truth = torch.autograd.grad((lp_t * g_lp.double()).sum(), list(leaves))
    gh, gw, gb = LL.linear_token_logprobs_bwd(g_lp, e, h, w, b, t, lse, e, 1.0, IGN, True, False, False)
    assert gw.numel() == 0 and gb.numel() == 0
    check("d hidden only", gh, truth[0], torch.float32)
    gh, gw, gb = LL.linear_token_logprobs_bwd(g_lp, e, h, w, b, t, lse, e, 1.0, IGN, False, True, True)
    assert gh.numel() == 0
    check("d weight only", gw, truth[1], torch.float32)
    check("d bias", gb, truth[2], torch.float32)


def test_linear_token_logprobs_all_ignored_and_large_logits():
    N, V, H = 6, 300, 32
    h, w, _ = _linear_inputs(N, V, H, torch.float32, False)
    t = torch.full((N,), IGN, device=DEV)
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)
    assert (lp == 0).all() and (ent == 0).all()
    gh, gw, _ = LL.linear_token_logprobs_bwd(torch.ones(N, device=DEV), torch.ones(N, device=DEV), h, w, None, t,
                                             lse, ent, 1.0, IGN, True, True, False)
    assert (gh == 0).all() and (gw == 0).all()
    # logits of order ±1e4: the online LSE must stay finite and exact
    w_big = w * 3e3
    t = targets_for(N, V, frac=0.0)
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w_big, None, t, 1.0, IGN, True)
    _, lp_t, ent_t = _linear_truth(h, w_big, None, t, 1.0)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp - lp_t).abs().max().item() <= 1e-5 * lp_t.abs().max().item() + 1e-3
    assert (ent - ent_t).abs().max().item() <= 1e-3
    # gradients at the plain float32 tolerance: the backward rebuilds log p from the float64 lse (split_lse)
    g_lp, g_h = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    gh, gw, _ = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w_big, None, t, lse, ent, 1.0, IGN, True, True, False)
    leaves, lp_t, ent_t = _linear_truth(h, w_big, None, t, 1.0)
    truth = torch.autograd.grad((lp_t * g_lp.double() + ent_t * g_h.double()).sum(), [leaves[0], leaves[1]])
    check("d hidden (±1e4 logits)", gh, truth[0], torch.float32)
    check("d weight (±1e4 logits)", gw, truth[1], torch.float32)


def test_linear_token_logprobs_skips_ignored_row_blocks():
    """Prompt-like segments of ignored targets (whole row blocks are skipped by the kernels) next to live rows."""
    N, V, H = 70, 500, 32
    h, w, b = _linear_inputs(N, V, H, torch.float32, True)
    t = targets_for(N, V, frac=0.0)
    t[:40] = IGN  # rows 0-39: several whole blocks of every tile size, and a partial one
    t[64:] = IGN
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, b, t, 1.0, IGN, True)
    g_lp, g_h = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    gh, gw, gb = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, b, t, lse, ent, 1.0, IGN, True, True, True)
    leaves, lp_t, ent_t = _linear_truth(h, w, b, t, 1.0)
    truth = torch.autograd.grad((lp_t * g_lp.double() + ent_t * g_h.double()).sum(), list(leaves))
    for name, got, want in [("logprobs", lp, lp_t), ("entropy", ent, ent_t), ("d hidden", gh, truth[0]),
                            ("d weight", gw, truth[1]), ("d bias", gb, truth[2])]:
        check(name, got, want, torch.float32)
    assert torch.isfinite(lse).all() and (gh[:40] == 0).all() and (gh[64:] == 0).all()


def test_linear_true_class_gradient_no_cancellation_bf16():
    """A peaked softmax (p_target > 0.9, typically ≈ 0.99): every entry of g_z is small and d(hidden) = Σ_j g_j w_j comes out of them;
    forming (δ − p) after a bf16 rounding of p would swamp it (Liger PR #1419)."""
    N, V, H = 8, 300, 32
    h, w, _ = _linear_inputs(N, V, H, torch.float32, False, wscale=0.5)
    t = torch.arange(N, device=DEV) * 7
    w[t] = h * (12.0 / (h * h).sum(-1, keepdim=True))  # z_t = 12, other logits of order 0.5
    h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)
    lp, _, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, False)
    assert (lp.exp() > 0.9).all()
    g_lp, e = torch.ones(N, device=DEV), torch.empty(0, device=DEV)
    gh, gw, _ = LL.linear_token_logprobs_bwd(g_lp, e, h, w, None, t, lse, e, 1.0, IGN, True, True, False)
    leaves, lp_t, _ = _linear_truth(h, w, None, t, 1.0)
    truth = torch.autograd.grad(lp_t.sum(), [leaves[0], leaves[1]])
    check("d hidden (peaked)", gh, truth[0], torch.bfloat16)
    check("d weight (peaked)", gw, truth[1], torch.bfloat16)
    assert rel(gh, truth[0]) < 2**-7 and rel(gw, truth[1]) < 2**-7


def test_acc_matmul_strided_a():
    """The d(hidden) accumulator GEMM: c += a @ b with a row stride (the last, partial vocab chunk)."""
    a_full = torch.randn(21, 70, device=DEV)
    a = a_full[:, :53]
    b = torch.randn(53, 40, device=DEV)
    c = torch.randn(21, 40, device=DEV)
    expect = c.double() + a.double() @ b.double()
    LL._acc_matmul(c, a, b)
    assert rel(c, expect) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_backward_row_major_when_the_head_is_frozen(dtype, bias):
    """A frozen LM head (LoRA): the backward walks row chunks (several here, the last one partial), each complete
    over the vocabulary, so d hidden needs an accumulator of one chunk only. Same result as the vocab-major order."""
    N, V, H, T = (70 if DEV == "cpu" else 3001), 1031, 40, 0.7  # a GPU's row chunks are >= 1024 rows
    h, w, b = _linear_inputs(N, V, H, dtype, bias)
    plan = LL.backward_plan(N, V, H, w.element_size(), dtype == torch.float32, True, False, bias)
    assert plan.row_major and plan.rows < N and N % plan.rows != 0
    t = targets_for(N, V)
    ignored = plan.rows + 1
    t[:ignored] = IGN  # a whole ignored row chunk and a partly ignored one
    assert not LL.backward_plan(N, V, H, w.element_size(), dtype == torch.float32, True, True, bias).row_major
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, b, t, T, IGN, True)
    g_lp, g_h = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    gh, gw, gb = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, b, t, lse, ent, T, IGN, True, False, bias)
    assert gw.numel() == 0 and gh.dtype == dtype and (gb.numel() > 0) == bias
    leaves, lp_t, ent_t = _linear_truth(h, w, b, t, T)
    leaves_b, lp_b, ent_b = _linear_truth(h, w, b, t, T, dt=dtype)
    want = [leaves[0]] + ([leaves[2]] if bias else [])
    truth = torch.autograd.grad((lp_t * g_lp.double() + ent_t * g_h.double()).sum(), want)
    base = torch.autograd.grad((lp_b * g_lp.to(dtype) + ent_b * g_h.to(dtype)).sum(),
                               [leaves_b[0]] + ([leaves_b[2]] if bias else []))
    check("d hidden (row-major)", gh, truth[0], dtype, base[0])
    assert (gh[:ignored] == 0).all()
    if bias:
        check("d bias (row-major)", gb, truth[1], dtype, base[1])
    gh_v, _, gb_v = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, b, t, lse, ent, T, IGN, True, True, bias)
    assert rel(gh, gh_v) <= (1e-6 if dtype == torch.float32 else 2**-8)
    if bias:
        assert rel(gb, gb_v) <= (1e-6 if dtype == torch.float32 else 2**-8)


def test_linear_ppo_backward_row_major_scales_by_the_incoming_gradient():
    """linear_ppo_bwd with a frozen head takes the row-major order too, with the loss gradient read on the device."""
    from signalrl.kernels import linear_ppo as LP

    N, V, H = 45, 600, 32
    h, w, _ = _linear_inputs(N, V, H, torch.float32, False)
    t = targets_for(N, V)
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)
    g_lp, g_h = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    grad_loss = torch.tensor(-2.5, device=DEV)
    gh, gw, _ = LP.linear_ppo_bwd(grad_loss, g_lp, g_h, h, w, None, t, lse, ent, 1.0, IGN, True, False, False)
    assert gw.numel() == 0
    gh1, _, _ = LL.linear_token_logprobs_bwd(g_lp, g_h, h, w, None, t, lse, ent, 1.0, IGN, True, False, False)
    assert rel(gh, -2.5 * gh1) < 1e-6


def test_backward_plan_meets_the_extra_memory_target_for_a_frozen_head(monkeypatch):
    """GPU chunk sizes (what the interpreter does not use): a frozen head in bf16 stays within 1 % of the [N, V]
    float32 logits at the issue's shapes; a trainable head pays the float32 d hidden accumulator (H / V of them) plus
    one gradient chunk. The GPU tests assert the measured peak against ``extra_bytes``."""
    from signalrl.kernels import linear_logprobs_bwd as LLB

    monkeypatch.setattr(LLB, "INTERPRET", False)  # where backward_plan reads it
    H = 4096
    for V in (128256, 151936, 262144):
        for N in (8192, 16384, 32768):
            logits = 4 * N * V
            for bias in (False, True):
                frozen = LL.backward_plan(N, V, H, 2, False, True, False, bias)
                assert frozen.row_major and frozen.rows % 128 == 0 and frozen.rows >= 1024
                assert frozen.extra_bytes <= 0.01 * logits, (N, V, bias, frozen)
                # even chunks: the last one is no sliver that re-reads all of W for a few rows
                k = -(-N // frozen.rows)
                assert N - (k - 1) * frozen.rows >= frozen.rows - 128 * k, (N, frozen)
            full = LL.backward_plan(N, V, H, 2, False, True, True, False)
            assert not full.row_major and full.cols % 128 == 0
            assert full.extra_bytes == 4 * N * H + 2 * N * full.cols
            assert full.extra_bytes <= (H / V + 0.01) * logits, (N, V, full)
            head_only = LL.backward_plan(N, V, H, 2, False, False, True, False)
            assert head_only.extra_bytes == 2 * N * head_only.cols <= 0.01 * logits
    # N = 8200 would be 4 chunks of 2048 and one of 8 without evening out
    odd = LL.backward_plan(8200, 128256, H, 2, False, True, False, False)
    assert odd.rows == 1664 and 8200 - 4 * odd.rows == 1544
    # small problems: at least one GEMM-sized row chunk, never more than N rows
    small = LL.backward_plan(300, 32000, 256, 2, False, True, False, True)
    assert small.rows == 300 and not small.row_major
    assert small.extra_bytes == 300 * small.cols * 2 + 300 * 4 * 256 + 4 * 32000 + 4 * small.cols * (1 + 19)


# The offline sm_90 compile of these kernels (no GPU needed) lives in tests/kernels/test_offline_compile.py.


def test_backward_refuses_a_float32_lse():
    """The contract's lse is float64; a float32 one (e.g. from an old caller) would silently cost precision."""
    x = torch.randn(3, 50, device=DEV)
    t = targets_for(3, 50, frac=0.0)
    lp, ent, lse = TL.token_logprobs_fwd(x, t, 1.0, IGN, True)
    with pytest.raises(TypeError, match="lse must be float64"):
        TL.token_logprobs_bwd(lp, ent, x, t, lse.float(), ent, 1.0, IGN)
    h, w, _ = _linear_inputs(3, 50, 16, torch.float32, False)
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)
    with pytest.raises(TypeError, match="lse must be float64"):
        LL.linear_token_logprobs_bwd(lp, ent, h, w, None, t, lse.float(), ent, 1.0, IGN, True, True, False)
