"""linear_token_logprobs with a frozen LM head (LoRA): the native frozen-head plan, against float64 truth.

The plan (csrc/cpu/linear_logprobs_frozen.cpp) computes pw = Σ_{j≠t} p_j·W_j and c = Σ_{j≠t} p_j in the forward and
d hidden = (c·W_t − pw)·g / T in the backward; it serves a call whose hidden needs a gradient while the head does not.
"""
import itertools

import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import use_backend
from signalrl.ops._library import kernels_run
from signalrl.ops.linear_logprobs import frozen_head_plan

from ._oracle import assert_close, rel_err

pytestmark = pytest.mark.skipif(
    not ops.available_backends("linear_token_logprobs_frozen_fwd", "cpu").count("native"),
    reason="native extension not built",
)


def _case(N, H, V, dtype, seed, scale=1.0, with_bias=False, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        targets[i] = -100
    return hidden, weight, bias, targets


def _run(hidden, weight, bias, targets, temperature=1.0, g=None):
    """(log-probs, d hidden) through the native op with the head frozen, and the float64 reference's."""
    h = hidden.clone().requires_grad_()
    with use_backend("native"):
        assert frozen_head_plan(h, weight, bias, "native")
        lp = ops.linear_token_logprobs(h, weight, targets, bias=bias, temperature=temperature)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(99)) if g is None else g
    (gh,) = torch.autograd.grad(lp, h, g)
    h64 = hidden.double().requires_grad_()
    lp_t = reference.linear_token_logprobs(h64, weight.double(), targets, temperature=temperature,
                                           bias=None if bias is None else bias.double())
    (gh_t,) = torch.autograd.grad(lp_t, h64, g.double())
    return lp, gh, lp_t, gh_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V", [(1, 48, 1000), (37, 40, 1031), (130, 33, 3000), (5, 1, 7), (3, 16, 1)])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)])
def test_values_and_hidden_grad(dtype, N, H, V, with_bias, temperature):
    hidden, weight, bias, targets = _case(N, H, V, dtype, seed=N * V + H, with_bias=with_bias,
                                          ignored=range(0, N, 4) if N > 2 else ())
    lp, gh, lp_t, gh_t = _run(hidden, weight, bias, targets, temperature)
    assert lp.dtype == torch.float32 and gh.dtype == dtype and gh.shape == hidden.shape
    assert_close("logprobs", lp, lp_t, dtype)
    assert_close("d hidden", gh, gh_t, dtype)
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0) and torch.all(gh[ignored] == 0)


def test_the_plan_runs_many_row_and_vocab_blocks():
    """More rows than one row block (1024) and the one-sum plan for a wide H (per-group sums over the budget)."""
    for N, H, V in ((1100, 24, 1500), (300, 1024, 2100)):
        hidden, weight, bias, targets = _case(N, H, V, torch.float32, seed=N, ignored=(0, 5, N - 1))
        lp, gh, lp_t, gh_t = _run(hidden, weight, bias, targets)
        assert_close("logprobs", lp, lp_t, torch.float32)
        assert_close("d hidden", gh, gh_t, torch.float32)


def test_confident_tokens_keep_their_gradient():
    """p_t within e^-20 of 1 (the argmax target, a margin of 20 over the runner-up): d hidden is ~1e-10; W_t − Σ_j
    p_j·W_j cancels to float32 noise of W's size (PyTorch's float32 log_softmax backward: relative error ~0.8 here),
    the plan's c·W_t − pw is a difference of two terms of the gradient's own size. What is left is the float32
    logits' own rounding (|z| up to ~2e4 here: p_j = exp(z_j − z_t) carries |z|·2^-24)."""
    hidden, weight, _, _ = _case(16, 32, 500, torch.float32, seed=3)
    top2 = (hidden.double() @ weight.double().T).topk(2, dim=-1)
    hidden = (hidden * (20.0 / (top2.values[:, 0] - top2.values[:, 1])).unsqueeze(1).float())  # margin 20: p_t ≈ 1
    targets = top2.indices[:, 0]
    lp, gh, lp_t, gh_t = _run(hidden, weight, None, targets)
    assert gh_t.abs().max() < 1e-5 * weight.abs().max()
    err = rel_err(gh, gh_t, floor=1e-30)
    assert err < 1e-3
    h = hidden.clone().requires_grad_()
    with use_backend("reference"):
        lp_ref = ops.linear_token_logprobs(h, weight, targets)
    (gh_ref,) = torch.autograd.grad(lp_ref, h, torch.randn(lp.shape, generator=torch.Generator().manual_seed(99)))
    assert rel_err(gh_ref, gh_t, floor=1e-30) > 100 * err


def test_all_rows_ignored_and_huge_logits():
    hidden, weight, _, targets = _case(6, 8, 50, torch.float32, seed=4, ignored=range(6))
    lp, gh, _, _ = _run(hidden, weight, None, targets)
    assert torch.all(lp == 0) and torch.all(gh == 0)
    hidden, weight, _, targets = _case(9, 8, 300, torch.float32, seed=5, scale=3000.0)
    lp, gh, lp_t, gh_t = _run(hidden, weight, None, targets)
    assert torch.isfinite(lp).all() and torch.isfinite(gh).all()
    assert_close("logprobs", lp, lp_t, torch.float32)
    assert_close("d hidden", gh, gh_t, torch.float32)


def test_same_gradient_as_the_trained_head_plan():
    """The frozen plan and the trained-head plan (weight requires grad) agree on d hidden to float32 accuracy."""
    hidden, weight, bias, targets = _case(64, 32, 2000, torch.float32, seed=6, with_bias=True, ignored=(3,))
    _, gh_frozen, _, gh_t = _run(hidden, weight, bias, targets)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with use_backend("native"):
        lp = ops.linear_token_logprobs(h, w, targets, bias=bias)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(99))
    (gh_trained, _) = torch.autograd.grad(lp, (h, w), g)
    assert rel_err(gh_frozen, gh_t) < 1e-5 and rel_err(gh_trained, gh_t) < 1e-5


@pytest.mark.parametrize("case", ["frozen", "weight_trained", "bias_trained", "entropy", "no_grad", "hidden_frozen"])
def test_the_plan_is_chosen_only_where_it_serves(case):
    hidden, weight, bias, targets = _case(4, 8, 20, torch.float32, seed=7, with_bias=True)
    hidden.requires_grad_(case != "hidden_frozen")
    weight.requires_grad_(case == "weight_trained")
    bias.requires_grad_(case == "bias_trained")

    def step():
        with torch.set_grad_enabled(case != "no_grad"), use_backend("native"):
            out = ops.linear_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=case == "entropy")
            lp = out[0] if case == "entropy" else out
            if lp.requires_grad:
                lp.sum().backward()

    ran = kernels_run(step)
    if case == "frozen":
        assert ran == {"signalrl::linear_token_logprobs_frozen_fwd", "signalrl::linear_token_logprobs_frozen_bwd"}
    else:  # the kept-logits plan with a gradient (tests/ops/test_linear_logprobs_kept.py), else the plain forward
        assert ran and not any("frozen" in k for k in ran), ran
    assert not frozen_head_plan(hidden.detach().requires_grad_(), weight.detach(), None, "reference")


def test_results_do_not_depend_on_the_number_of_threads():
    hidden, weight, _, targets = _case(200, 64, 5000, torch.float32, seed=8, ignored=(1, 2))
    threads = torch.get_num_threads()
    outs = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            lp, ent, pw, c = torch.ops.signalrl.linear_token_logprobs_frozen_fwd(hidden, weight, None, targets, 1.0,
                                                                                 -100, True)
            g = torch.ops.signalrl.linear_token_logprobs_frozen_bwd(torch.ones(200), weight, targets, pw, c, 1.0)
            outs.append((lp, ent, pw, c, g))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("N,H,V", [(37, 40, 1031), (300, 1024, 2100)])
def test_kernel_entropy_values(N, H, V):
    """The plan's forward also gives each row's entropy (a value, for linear_ppo_loss's statistics)."""
    hidden, weight, bias, targets = _case(N, H, V, torch.float32, seed=11, with_bias=True, ignored=(2,))
    lp, ent, pw, c = torch.ops.signalrl.linear_token_logprobs_frozen_fwd(hidden, weight, bias, targets, 0.8, -100,
                                                                         True)
    lp_t, ent_t = reference.linear_token_logprobs(hidden.double(), weight.double(), targets, bias=bias.double(),
                                                  temperature=0.8, return_entropy=True)
    assert_close("logprobs", lp, lp_t, torch.float32)
    assert_close("entropy", ent, ent_t, torch.float32)
    assert c[2] == 0 and torch.all(pw[2] == 0)


def test_torch_compile_traces_the_plan():
    hidden, weight, _, targets = _case(12, 16, 300, torch.float32, seed=9)

    def f(h):
        with use_backend("native"):
            return ops.linear_token_logprobs(h, weight, targets).sum()

    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    f(h1).backward()
    torch.compile(f, backend="aot_eager")(h2).backward()
    torch.testing.assert_close(h2.grad, h1.grad)


def test_check_mode_compares_the_plan_with_the_reference():
    hidden, weight, _, targets = _case(10, 16, 200, torch.float32, seed=10)
    h = hidden.clone().requires_grad_()
    with use_backend("native"), ops.check_mode():
        ops.linear_token_logprobs(h, weight, targets).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("bad", ["pw_dtype", "weight_width", "coef_len"])
def test_backward_kernel_names_a_bad_argument(bad):
    w, t = torch.randn(30, 8), torch.randint(0, 30, (5,))
    pw, c, g = torch.zeros(5, 8), torch.zeros(5), torch.ones(5)
    if bad == "pw_dtype":
        pw = pw.double()
    elif bad == "weight_width":
        w = torch.randn(30, 9)
    else:
        c = torch.zeros(4)
    with pytest.raises(RuntimeError, match={"pw_dtype": "pw", "weight_width": "weight", "coef_len": "coef"}[bad]):
        torch.ops.signalrl.linear_token_logprobs_frozen_bwd(g, w, t, pw, c, 1.0)


def test_kernel_grid_against_reference():
    """A sweep of small shapes and settings (odd sizes, one-token vocabularies, dropped rows) in float32."""
    for N, H, V, T in itertools.product((1, 3, 17), (1, 5), (1, 2, 65, 1025), (1.0, 2.5)):
        hidden, weight, _, targets = _case(N, H, V, torch.float32, seed=N + 7 * H + 13 * V, scale=2.0,
                                           ignored=(0,) if N > 1 else ())
        lp, gh, lp_t, gh_t = _run(hidden, weight, None, targets, T)
        assert_close(f"logprobs N={N} H={H} V={V} T={T}", lp, lp_t, torch.float32)
        assert_close(f"d hidden N={N} H={H} V={V} T={T}", gh, gh_t, torch.float32)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(kl_coef=0.05, ref=True, dual_clip=3.0, aggregation="seq-mean-token-sum", temperature=0.8, with_bias=True),
    dict(kl_coef=0.1, ref=True, kl_estimator="k1", aggregation="seq-mean-token-mean", clip_high=0.28),
], ids=["default", "kl-dual-clip-bias", "k1-seq-mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ppo_loss_frozen_head(settings, dtype):
    """linear_ppo_loss with a frozen head and no entropy bonus takes the plan: loss, statistics and d hidden as the
    float64 reference's."""
    settings = dict(settings)
    with_bias, use_ref, temperature = settings.pop("with_bias", False), settings.pop("ref", False), \
        settings.pop("temperature", 1.0)
    B, T, H, V = 3, 11, 24, 700
    hidden, weight, bias, targets = _case(B * T, H, V, dtype, seed=12, with_bias=with_bias, ignored=(0, 11, 22))
    g = torch.Generator().manual_seed(13)
    hidden, targets = hidden.reshape(B, T, H), targets.reshape(B, T)
    old = -torch.rand(B, T, generator=g) * 3 - 4
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    ref = old + 0.1 * torch.randn(B, T, generator=g) if use_ref else None
    kw = dict(mask=mask, bias=bias, ref_logprobs=ref, temperature=temperature, **settings)
    h = hidden.clone().requires_grad_()

    def step():
        with use_backend("native"):
            loss, stats = ops.linear_ppo_loss(h, weight, targets, old, adv, **kw)
        loss.backward()
        return loss, stats

    ran = kernels_run(lambda: step())
    assert "signalrl::linear_ppo_frozen_fwd" in ran and "signalrl::linear_ppo_fwd" not in ran, ran
    h.grad = None
    loss, stats = step()
    h64 = hidden.double().requires_grad_()
    kw64 = dict(kw, bias=None if bias is None else bias.double())
    loss_t, stats_t = reference.linear_ppo_loss(h64, weight.double(), targets, old.double(), adv.double(), **kw64)
    loss_t.backward()
    # the loss sums O(1) terms that can cancel and small statistics compare absolutely (as tests/ops/test_linear_ppo.py)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - loss_t.item()) <= tol * max(1.0, abs(loss_t.item())), (loss.item(), loss_t.item())
    for k in stats_t:
        if (stats[k].double() - stats_t[k]).abs().item() > (1e-6 if dtype == torch.float32 else 1e-3):
            assert_close(f"stat {k}", stats[k], stats_t[k], dtype)
    assert h.grad.dtype == dtype
    assert_close("d hidden", h.grad, h64.grad, dtype)


def test_linear_ppo_loss_with_an_entropy_bonus_does_not_take_the_plan():
    hidden, weight, _, targets = _case(16, 8, 50, torch.float32, seed=14)
    h = hidden.clone().requires_grad_()

    def step():
        with use_backend("native"):
            loss, _ = ops.linear_ppo_loss(h[None], weight, targets[None], -torch.rand(1, 16) - 3, torch.randn(1, 16),
                                          entropy_coef=0.01)
        loss.backward()

    ran = kernels_run(step)  # the kept-logits plan (tests/ops/test_linear_logprobs_kept.py)
    assert "signalrl::linear_ppo_kept_fwd" in ran and not any("frozen" in k for k in ran), ran
