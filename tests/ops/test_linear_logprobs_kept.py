"""The native kept-logits plan of linear_token_logprobs and linear_ppo_loss, against float64 truth.

A call that needs a gradient (and is not served by the frozen-head plan) keeps the first K columns of its float32
logits from the forward, K = keep_columns(N, V) within KEEP_FLOATS (4 MiB), and the backward reads them instead of
recomputing their GEMM (csrc/cpu/linear_logprobs.cpp). The kernels themselves are checked column by column in
tests/test_native_build.py; here: the op layer's choice, every budget (none, part, all) through autograd, threads,
retain_graph, torch.compile and the memory bound.
"""
import pytest
import torch

import signalrl.ops as ops
import signalrl.ops.linear_logprobs as linear_logprobs
from signalrl import reference
from signalrl.ops import use_backend
from signalrl.ops._library import kernels_run
from signalrl.ops.linear_logprobs import keep_columns, kept_plan, keep_floats_from_env

from ._oracle import assert_close

KEEP_FLOATS = keep_floats_from_env({})  # 4 MiB

pytestmark = pytest.mark.skipif(
    not ops.available_backends("linear_token_logprobs_kept_fwd", "cpu").count("native"),
    reason="native extension not built",
)


@pytest.fixture(autouse=True)
def _default_bound(monkeypatch):
    """The default 4 MiB bound, whatever SIGNAL_KEEP_LOGITS_MIB says in this shell."""
    monkeypatch.setattr(linear_logprobs, "KEEP_FLOATS", KEEP_FLOATS)


def _case(N, H, V, dtype, seed, with_bias=False, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        targets[i] = -100
    return hidden, weight, bias, targets


# the budget in floats: none kept (the recompute plan), part of the columns, all of them
BUDGETS = {"none": lambda n, v: 0, "part": lambda n, v: n * (v // 3), "all": lambda n, v: KEEP_FLOATS}


def test_keep_columns_stays_within_the_bound():
    assert keep_columns(128, 8192) == 8192 and keep_columns(32, 32000) == 32000  # N·V ≤ 2^20: all
    assert keep_columns(128, 32000) == 8192  # 2^20 / 128, a multiple of 64
    assert keep_columns(20000, 32000) == 0  # not one 64-column block fits
    for n in (1, 7, 100, 1000, 4096, 16385):
        for v in (1, 63, 1000, 32000, 128256):
            k = keep_columns(n, v)
            assert 0 <= k <= v and n * k <= KEEP_FLOATS
            assert k == v or k % 64 == 0


def test_the_bound_comes_from_the_environment():
    assert KEEP_FLOATS == 1 << 20
    assert keep_floats_from_env({"SIGNAL_KEEP_LOGITS_MIB": "16"}) == 1 << 22
    assert keep_floats_from_env({"SIGNAL_KEEP_LOGITS_MIB": " 0.5 "}) == 1 << 17
    assert keep_floats_from_env({"SIGNAL_KEEP_LOGITS_MIB": "0"}) == 0
    for bad in ("-1", "nan", "inf", "4MiB"):
        with pytest.raises(ValueError, match="SIGNAL_KEEP_LOGITS_MIB: expected a number of MiB >= 0"):
            keep_floats_from_env({"SIGNAL_KEEP_LOGITS_MIB": bad})


@pytest.mark.parametrize("budget", BUDGETS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V", [(37, 40, 3000), (5, 1, 7), (130, 24, 2100), (40, 3300, 2100)])
def test_linear_token_logprobs_values_and_grads(monkeypatch, budget, dtype, N, H, V):
    """Every budget gives the float64 reference's log-probs, entropy and gradients (hidden, weight, bias), with
    dropped rows; (40, 3300, 2100) takes the backward's one-block-at-a-time plan (H too wide for group partials)."""
    monkeypatch.setattr(linear_logprobs, "KEEP_FLOATS", BUDGETS[budget](N, V))
    hidden, weight, bias, targets = _case(N, H, V, dtype, seed=N + H + V, with_bias=True,
                                          ignored=range(0, N, 5) if N > 2 else ())
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with use_backend("native"):
        assert kept_plan(*leaves, "native") == keep_columns(N, V)
        lp, ent = ops.linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=0.8,
                                            return_entropy=True)
    truth = [t.detach().double().requires_grad_() for t in leaves]
    lp_t, ent_t = reference.linear_token_logprobs(truth[0], truth[1], targets, bias=truth[2], temperature=0.8,
                                                  return_entropy=True)
    assert_close("logprobs", lp, lp_t, dtype)
    assert_close("entropy", ent, ent_t, dtype)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp_t * g_lp.double() + ent_t * g_ent.double()).sum().backward()
    for name, got, want in zip(("d hidden", "d weight", "d bias"), leaves, truth):
        assert got.grad.dtype == dtype
        assert_close(name, got.grad, want.grad, dtype)


@pytest.mark.parametrize("budget", BUDGETS.keys())
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_linear_ppo_loss_values_and_grads(monkeypatch, budget, entropy_coef):
    B, T, H, V = 3, 11, 24, 2500
    monkeypatch.setattr(linear_logprobs, "KEEP_FLOATS", BUDGETS[budget](B * T, V))
    hidden, weight, bias, targets = _case(B * T, H, V, torch.float32, seed=12, with_bias=True, ignored=(0, 11, 22))
    g = torch.Generator().manual_seed(13)
    hidden, targets = hidden.reshape(B, T, H), targets.reshape(B, T)
    old = -torch.rand(B, T, generator=g) * 3 - 4
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    kw = dict(mask=mask, ref_logprobs=ref, kl_coef=0.05, dual_clip=3.0, entropy_coef=entropy_coef, temperature=0.9,
              aggregation="seq-mean-token-mean")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]

    def step():
        with use_backend("native"):
            loss, stats = ops.linear_ppo_loss(leaves[0], leaves[1], targets, old, adv, bias=leaves[2], **kw)
        (loss * 1.7).backward()
        return loss, stats

    ran = kernels_run(step)
    if budget == "none":
        assert "signalrl::linear_ppo_fwd" in ran and not any("kept" in k for k in ran), ran
    else:
        assert {"signalrl::linear_ppo_kept_fwd", "signalrl::linear_token_logprobs_kept_bwd"} <= ran, ran
    for t in leaves:
        t.grad = None
    loss, stats = step()
    truth = [t.detach().double().requires_grad_() for t in leaves]
    loss_t, stats_t = reference.linear_ppo_loss(truth[0], truth[1], targets, old.double(), adv.double(),
                                                bias=truth[2], **dict(kw, ref_logprobs=ref.double()))
    (loss_t * 1.7).backward()
    torch.testing.assert_close(loss.double(), loss_t, rtol=1e-5, atol=1e-6)
    for k, v in stats_t.items():
        torch.testing.assert_close(stats[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), leaves, truth):
        assert_close(name, got.grad, want.grad, torch.float32)


@pytest.mark.parametrize("case", ["weight_trained", "bias_trained", "frozen_with_entropy", "frozen", "no_grad",
                                  "too_many_rows"])
def test_the_plan_is_chosen_where_it_serves(case):
    N = 20000 if case == "too_many_rows" else 4  # 20000 rows: not one 64-column block within the bound
    hidden, weight, bias, targets = _case(N, 8, 70, torch.float32, seed=7, with_bias=True)
    hidden.requires_grad_(case != "no_grad")
    weight.requires_grad_(case in ("weight_trained", "too_many_rows"))
    bias.requires_grad_(case == "bias_trained")

    def step():
        with use_backend("native"):
            out = ops.linear_token_logprobs(hidden, weight, targets, bias=bias,
                                            return_entropy=case == "frozen_with_entropy")
            lp = out[0] if case == "frozen_with_entropy" else out
            if lp.requires_grad:
                lp.sum().backward()

    ran = kernels_run(step)
    want = {
        "frozen": {"signalrl::linear_token_logprobs_frozen_fwd", "signalrl::linear_token_logprobs_frozen_bwd"},
        "no_grad": {"signalrl::linear_token_logprobs_fwd"},
        "too_many_rows": {"signalrl::linear_token_logprobs_fwd", "signalrl::linear_token_logprobs_bwd"},
    }.get(case, {"signalrl::linear_token_logprobs_kept_fwd", "signalrl::linear_token_logprobs_kept_bwd"})
    assert ran == want
    assert kept_plan(hidden.detach().requires_grad_(), weight, bias, "reference") == 0


def test_the_kept_logits_stay_within_the_bound():
    """What autograd keeps from forward to backward: the kept logits are [N, keep_columns(N, V)] float32 (within
    4 MiB), beside the inputs and [N] vectors."""
    for N, V in ((64, 3000), (300, 5000)):  # all columns; 3456 of 5000 (300·3456 ≤ 2^20)
        hidden, weight, _, targets = _case(N, 16, V, torch.float32, seed=N)
        hidden.requires_grad_()
        weight.requires_grad_()
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), use_backend("native"):
            ops.linear_token_logprobs(hidden, weight, targets)
        big = [t for t in saved if t.dim() == 2 and t.shape[0] == N and t.shape[1] != 16]
        assert [tuple(t.shape) for t in big] == [(N, keep_columns(N, V))]
        assert big[0].dtype == torch.float32 and big[0].numel() * 4 <= 4 * 2**20


def test_backward_twice_with_retain_graph():
    """The backward reads the kept logits and leaves them as they were: a second backward gives the same grads."""
    hidden, weight, bias, targets = _case(30, 16, 900, torch.float32, seed=3, with_bias=True, ignored=(4,))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with use_backend("native"):
        lp, ent = ops.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], return_entropy=True)
    loss = (lp * torch.linspace(-1, 1, 30)).sum() + ent.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_number_of_threads():
    hidden, weight, bias, targets = _case(200, 64, 5000, torch.float32, seed=8, with_bias=True, ignored=(1, 2))
    fwd, bwd = torch.ops.signalrl.linear_token_logprobs_kept_fwd, torch.ops.signalrl.linear_token_logprobs_kept_bwd
    threads = torch.get_num_threads()
    outs = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            lp, ent, lse, kept = fwd(hidden, weight, bias, targets, 1.0, -100, True, 2048)
            grads = bwd(torch.ones(200), torch.ones(200), kept, hidden, weight, bias, targets, lse, ent, 1.0, -100,
                        True, True, True)
            outs.append((lp, ent, lse, kept[:198]) + tuple(grads))  # kept rows: the 198 not ignored
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_torch_compile_traces_the_plan():
    hidden, weight, _, targets = _case(12, 16, 300, torch.float32, seed=9)

    def f(h, w):
        with use_backend("native"):
            return ops.linear_token_logprobs(h, w, targets).sum()

    leaves1 = [t.clone().requires_grad_() for t in (hidden, weight)]
    leaves2 = [t.clone().requires_grad_() for t in (hidden, weight)]
    f(*leaves1).backward()
    torch.compile(f, backend="aot_eager")(*leaves2).backward()
    for a, b in zip(leaves1, leaves2):
        torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("bad", ["kept_dtype", "kept_rows", "kept_cols", "keep_cols"])
def test_kernels_name_a_bad_argument(bad):
    hidden, weight, _, targets = _case(5, 8, 30, torch.float32, seed=10)
    fwd, bwd = torch.ops.signalrl.linear_token_logprobs_kept_fwd, torch.ops.signalrl.linear_token_logprobs_kept_bwd
    if bad == "keep_cols":
        with pytest.raises(RuntimeError, match="keep_cols must be in"):
            fwd(hidden, weight, None, targets, 1.0, -100, False, 31)
        return
    lp, ent, lse, kept = fwd(hidden, weight, None, targets, 1.0, -100, False, 30)
    kept = {"kept_dtype": kept.double(), "kept_rows": kept[:4], "kept_cols": torch.zeros(5, 31)}[bad]
    with pytest.raises(RuntimeError, match="kept must be"):
        bwd(torch.ones(5), torch.empty(0), kept, hidden, weight, None, targets, lse, torch.empty(0), 1.0, -100,
            True, True, False)
