"""Masks select, on every backend (issue 12): whatever a masked position of a per-token input holds (NaN, ±inf,
1e30) — and the same for ``ignore_index`` targets and for rewards/values outside a sequence — values, statistics and
gradients equal those computed with zeros there, and gradients there are exactly 0. A zero advantage contributes
nothing, whatever the ratio; ``log_ratio_clamp`` clamps log ρ as torch.clamp does."""
import math

import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import use_backend
from signalrl.ops.ppo import PPO_TOKEN_FWD

from ._oracle import backend_params, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter warns on inf/NaN lanes

GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)
PPO = backend_params("ppo_token_fwd")
VALUE = backend_params("value_loss_fwd")
LINEAR_PPO = backend_params("linear_ppo_fwd")
TOKEN = backend_params("token_logprobs_fwd")
LINEAR = backend_params("linear_token_logprobs_fwd")
GAE = backend_params("gae_fwd")
IGN = -100


def _fill(x: torch.Tensor, keep: torch.Tensor, value: float) -> torch.Tensor:
    """x where keep, else ``value`` (0 gives the clean batch)."""
    return torch.where(keep, x, torch.full_like(x, value))


def _same(what: str, got, base) -> None:
    """Equal to ≤ 1e-7 (in practice bit-identical), NaN/inf at the same places."""
    got, base = dict(got), dict(base)
    assert got.keys() == base.keys()
    for k in base:
        g, b = got[k].detach().double().cpu(), base[k].detach().double().cpu()
        torch.testing.assert_close(g, b, rtol=0.0, atol=1e-7, equal_nan=True, msg=lambda m, k=k: f"{what} / {k}: {m}")


def _mask(shape) -> torch.Tensor:
    """Random counted tokens, a fully masked last row and a masked span (never all counted)."""
    m = torch.rand(shape) > 0.35
    m[-1] = False
    m[0, 2:5] = False
    return m


# --- clipped_surrogate / value_loss ----------------------------------------------------------


def _surrogate(backend, device, lp, old, adv, mask, **kw):
    x = lp.detach().clone().to(device).requires_grad_()
    with use_backend(backend):
        loss, stats = ops.clipped_surrogate(x, old.to(device), adv.to(device), mask.to(device), **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return dict(loss=loss.detach(), grad=grad, **stats)


@pytest.mark.parametrize("backend,device", PPO)
@pytest.mark.parametrize(
    "kw", [dict(), dict(clip_high=0.28, dual_clip=2.0, log_ratio_clamp=0.5, aggregation="seq-mean-token-mean")],
    ids=["plain", "dual-clamp-seqmean"],
)
def test_clipped_surrogate_masked_garbage(backend, device, kw):
    shape = (3, 11)
    mask = _mask(shape)
    lp = torch.rand(shape) * -3.0
    old, adv = lp + 0.4 * torch.randn(shape), torch.randn(shape)
    base = _surrogate(backend, device, *(_fill(t, mask, 0.0) for t in (lp, old, adv)), mask, **kw)
    assert torch.isfinite(base["loss"]) and (base["grad"].cpu()[~mask] == 0).all()
    for g in GARBAGE:
        got = _surrogate(backend, device, *(_fill(t, mask, g) for t in (lp, old, adv)), mask, **kw)
        _same(f"garbage {g}", got, base)
        assert (got["grad"].cpu()[~mask] == 0).all()


def _value(backend, device, v, old, ret, mask, **kw):
    x = v.detach().clone().to(device).requires_grad_()
    with use_backend(backend):
        loss, stats = ops.value_loss(x, old.to(device), ret.to(device), mask.to(device), **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return dict(loss=loss.detach(), grad=grad, **stats)


@pytest.mark.parametrize("backend,device", VALUE)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_masked_garbage(backend, device, clip):
    shape = (3, 11)
    mask = _mask(shape)
    v = torch.randn(shape)
    old, ret = v + 0.3 * torch.randn(shape), v + torch.randn(shape)
    kw = dict(clip=clip, aggregation="seq-mean-token-sum")
    base = _value(backend, device, *(_fill(t, mask, 0.0) for t in (v, old, ret)), mask, **kw)
    for g in GARBAGE:
        got = _value(backend, device, *(_fill(t, mask, g) for t in (v, old, ret)), mask, **kw)
        _same(f"garbage {g}", got, base)
        assert (got["grad"].cpu()[~mask] == 0).all()


@pytest.mark.parametrize("backend,device", [p for p in PPO if p.values[0] != "reference"] or [("none", "cpu")])
@pytest.mark.parametrize("estimator", ["k3", "abs"])
def test_ppo_token_kernel_masked_garbage_with_kl_and_entropy(backend, device, estimator):
    """The fused epilogue (what linear_ppo_loss runs): ref_logprobs and entropy are selected too."""
    if backend == "none":
        pytest.skip("no fast backend on this machine")
    from signalrl.ops import token_weights

    fwd = PPO_TOKEN_FWD.op(backend, torch.device(device))
    n = 40
    mask = torch.rand(n) > 0.4
    mask[:3] = False
    lp = torch.rand(n) * -3.0
    old, adv, ref, ent = lp + 0.4 * torch.randn(n), torch.randn(n), lp + 0.3 * torch.randn(n), torch.rand(n) * 3

    def run(value):
        vec = [_fill(t, mask, value).to(device) for t in (lp, old, adv)]
        w, m = token_weights(mask, "token-mean").to(device), mask.float().to(device)
        side = [_fill(t, mask, value).to(device) for t in (ref, ent)]
        loss, g_lp, g_ent, stats = fwd(*vec, w, m, *side, 0.2, 0.28, 1.5, estimator, 0.1, 0.01, 2.0)
        return dict(loss=loss, g_lp=g_lp, g_ent=g_ent, stats=stats)

    base = run(0.0)
    assert torch.isfinite(base["stats"]).all()
    for g in GARBAGE:
        got = run(g)
        _same(f"garbage {g}", got, base)
        assert (got["g_lp"].cpu()[~mask] == 0).all() and (got["g_ent"].cpu()[~mask] == 0).all()


# --- linear_ppo_loss -------------------------------------------------------------------------


def _linear_inputs(B=2, T=7, H=16, V=64):
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) * (2.0 / H**0.5)
    bias = torch.randn(V) * 0.1
    targets = torch.randint(0, V, (B, T))
    targets[0, 1] = targets[1, 4] = IGN
    mask = torch.rand(B, T) > 0.3
    mask[1, 0] = False
    mask[0, 1] = True  # counted by the mask, ignored by its target
    with torch.no_grad():
        lp = reference.linear_token_logprobs(hidden.double(), weight.double(), targets, bias=bias.double()).float()
    return hidden, weight, bias, targets, mask, lp


def _linear_ppo(backend, device, hidden, weight, bias, targets, old, adv, mask, ref, **kw):
    leaves = [t.detach().clone().to(device).requires_grad_() for t in (hidden, weight, bias)]
    with use_backend(backend):
        loss, stats = ops.linear_ppo_loss(
            leaves[0], leaves[1], targets.to(device), old.to(device), adv.to(device), mask.to(device),
            bias=leaves[2], ref_logprobs=ref.to(device), **kw,
        )
    gh, gw, gb = torch.autograd.grad(loss, leaves)
    return dict(loss=loss.detach(), d_hidden=gh, d_weight=gw, d_bias=gb, **stats)


@pytest.mark.parametrize("backend,device", LINEAR_PPO)
def test_linear_ppo_masked_and_ignored_garbage(backend, device):
    hidden, weight, bias, targets, mask, lp = _linear_inputs()
    counted = mask & (targets != IGN)
    old, adv, ref = lp + 0.4 * torch.randn(lp.shape), torch.randn(lp.shape), lp + 0.3 * torch.randn(lp.shape)
    kw = dict(dual_clip=2.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, log_ratio_clamp=1.0)

    def run(value):
        side = [_fill(t, counted, value) for t in (old, adv, ref)]
        return _linear_ppo(backend, device, hidden, weight, bias, targets, side[0], side[1], mask, side[2], **kw)

    base = run(0.0)
    assert all(torch.isfinite(v).all() for v in base.values())
    for g in GARBAGE:
        _same(f"garbage {g}", run(g), base)


# --- token_logprobs / linear_token_logprobs: ignored targets --------------------------------


@pytest.mark.parametrize("backend,device", TOKEN)
def test_token_logprobs_ignored_rows_and_their_upstream_gradient(backend, device):
    """Ignored rows: their logits and the incoming gradients there may hold anything."""
    N, V = 9, 50
    targets = torch.randint(0, V, (N,))
    targets[[0, 4, 5]] = IGN
    valid = targets != IGN
    logits = torch.randn(N, V) * 3
    g_lp, g_ent = torch.randn(N), torch.randn(N)

    def run(value):
        x = torch.where(valid[:, None], logits, torch.full_like(logits, value)).to(device).requires_grad_()
        with use_backend(backend):
            lp, ent = ops.token_logprobs(x, targets.to(device), return_entropy=True)
        grads = [_fill(g, valid, value).to(device) for g in (g_lp, g_ent)]
        (gx,) = torch.autograd.grad((lp, ent), x, grads)
        return dict(lp=lp, ent=ent, grad=gx)

    base = run(0.0)
    for g in GARBAGE:
        got = run(g)
        _same(f"garbage {g}", got, base)
        assert (got["grad"].cpu()[~valid] == 0).all()


@pytest.mark.parametrize("backend,device", LINEAR)
def test_linear_token_logprobs_upstream_gradient_at_ignored_targets(backend, device):
    hidden, weight, bias, targets, _, _ = _linear_inputs()
    valid = targets != IGN
    g_lp, g_ent = torch.randn(targets.shape), torch.randn(targets.shape)

    def run(value):
        leaves = [t.clone().to(device).requires_grad_() for t in (hidden, weight, bias)]
        with use_backend(backend):
            lp, ent = ops.linear_token_logprobs(leaves[0], leaves[1], targets.to(device), bias=leaves[2],
                                                return_entropy=True)
        grads = [_fill(g, valid, value).to(device) for g in (g_lp, g_ent)]
        gh, gw, gb = torch.autograd.grad((lp, ent), leaves, grads)
        return dict(lp=lp, ent=ent, d_hidden=gh, d_weight=gw, d_bias=gb)

    base = run(0.0)
    for g in GARBAGE:
        _same(f"garbage {g}", run(g), base)


# --- gae, masked statistics, aggregation ----------------------------------------------------


@pytest.mark.parametrize("backend,device", GAE)
def test_gae_rewards_and_values_outside_the_sequence(backend, device):
    B, T = 4, 37
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :9] = False  # left padding
    mask[1, 30:] = False  # right padding
    mask[2, 10:20] = False  # a span (tool output)
    mask[3] = False
    rewards, values, last = torch.randn(B, T), torch.randn(B, T), torch.randn(B)

    def run(value):
        with use_backend(backend):
            adv, ret = ops.gae(_fill(rewards, mask, value).to(device), _fill(values, mask, value).to(device),
                               mask.to(device), last_values=last.to(device))
        return dict(adv=adv, ret=ret)

    base = run(0.0)
    assert torch.isfinite(base["adv"]).all()
    for g in GARBAGE:
        _same(f"garbage {g}", run(g), base)


def test_masked_statistics_and_aggregation_ignore_masked_garbage():
    x0 = torch.randn(3, 8)
    mask = _mask((3, 8))

    def run(value):
        x = _fill(x0, mask, value).requires_grad_()
        out = dict(
            mean=ops.masked_mean(x, mask), mean_dim=ops.masked_mean(x, mask, dim=-1),
            whiten=ops.masked_whiten(x, mask), whiten_keep=ops.masked_whiten(x, mask, shift_mean=False),
            **{agg: reference.aggregate(x, mask, agg) for agg in reference.AGGREGATIONS},
        )
        total = sum(v.sum() * (i + 1) for i, v in enumerate(out.values()))
        (out["grad"],) = torch.autograd.grad(total, x)
        return out

    base = run(0.0)
    for g in GARBAGE:
        got = run(g)
        _same(f"garbage {g}", got, base)
        assert (got["grad"][~mask] == 0).all()


# --- zero advantage with an infinite ratio ----------------------------------------------------


@pytest.mark.parametrize("backend,device", PPO)
@pytest.mark.parametrize("kw", [dict(), dict(dual_clip=3.0), dict(log_ratio_clamp=20.0)], ids=["plain", "dual", "clamp"])
def test_zero_advantage_with_an_infinite_ratio_contributes_nothing(backend, device, kw):
    shape = (2, 9)
    lp = torch.rand(shape) * -3.0
    old, adv = lp + 0.4 * torch.randn(shape), torch.randn(shape)
    zero = torch.zeros(shape, dtype=torch.bool)
    zero[0, 1] = zero[0, 6] = zero[1, 3] = True
    adv[zero] = 0.0
    mask = torch.ones(shape)
    base = _surrogate(backend, device, lp, old, adv, mask, **kw)
    for o in (float("-inf"), float("inf"), -1e30):  # ρ = inf, ρ = 0, ρ overflows
        got = _surrogate(backend, device, lp, torch.where(zero, torch.full_like(old, o), old), adv, mask, **kw)
        assert torch.isfinite(got["loss"]) and torch.isfinite(got["grad"]).all()
        assert (got["grad"].cpu()[zero] == 0).all()
        _same(f"old={o}", dict(loss=got["loss"], grad=got["grad"]), dict(loss=base["loss"], grad=base["grad"]))
        assert got["clip_fraction"] == base["clip_fraction"] and got["dual_clip_fraction"] == base["dual_clip_fraction"]


@pytest.mark.parametrize("backend,device", LINEAR_PPO)
def test_linear_ppo_zero_advantage_with_an_infinite_ratio(backend, device):
    hidden, weight, bias, targets, mask, lp = _linear_inputs()
    counted = mask & (targets != IGN)
    old, adv = lp + 0.4 * torch.randn(lp.shape), torch.randn(lp.shape)
    pick = counted & (torch.rand(lp.shape) < 0.5)
    r, c = counted.nonzero()[0].tolist()
    pick[r, c] = True
    adv[pick] = 0.0
    kw = dict(entropy_coef=0.01)
    base = _linear_ppo(backend, device, hidden, weight, bias, targets, old, adv, mask, lp, **kw)
    got = _linear_ppo(backend, device, hidden, weight, bias, targets, _fill(old, ~pick, float("-inf")), adv, mask,
                      lp, **kw)
    assert torch.isfinite(got["loss"]) and all(torch.isfinite(got[k]).all() for k in ("d_hidden", "d_weight"))
    keys = ("loss", "d_hidden", "d_weight", "d_bias", "pg_loss", "clip_fraction")
    _same("old=-inf at A=0", {k: got[k] for k in keys}, {k: base[k] for k in keys})


# --- log_ratio_clamp ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", PPO)
@pytest.mark.parametrize("kw", [dict(), dict(dual_clip=1.5, aggregation="seq-mean-token-sum")], ids=["plain", "dual"])
def test_log_ratio_clamp_matches_the_reference_and_stops_the_gradient(backend, device, kw):
    shape, c = (3, 13), 0.3
    lp = torch.rand(shape) * -3.0
    old, adv = lp + 0.6 * torch.randn(shape), torch.randn(shape)
    mask = _mask(shape)
    got = _surrogate(backend, device, lp, old, adv, mask, log_ratio_clamp=c, **kw)
    x = lp.double().requires_grad_()
    loss_t, stats_t = reference.clipped_surrogate(x, old.double(), adv.double(), mask, log_ratio_clamp=c, **kw)
    loss_t.backward()
    loss_t = loss_t.detach()
    assert abs(float(got["loss"]) - float(loss_t)) <= 1e-5 * max(1.0, abs(float(loss_t)))
    assert rel_err(got["grad"].cpu(), x.grad) < 1e-5
    for k, v in stats_t.items():
        assert abs(float(got[k]) - float(v)) <= 1e-5 * max(1.0, abs(float(v))), k
    clamped = ((lp.double() - old.double()).abs() > c) & mask
    assert clamped.any() and (got["grad"].cpu()[clamped] == 0).all()
    # the stats see the clamped ratio
    assert float(got["ratio_max"]) <= math.exp(c) * (1 + 1e-6) and float(got["ratio_min"]) >= math.exp(-c) * (1 - 1e-6)


@pytest.mark.parametrize("backend,device", PPO)
def test_log_ratio_clamp_bounds_a_negative_advantage_at_a_huge_ratio(backend, device):
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    old = lp - torch.tensor([[100.0, 0.1, 0.0]])  # log ρ = 100 on the first token
    adv = torch.tensor([[-1.5, 0.7, -0.2]])
    mask = torch.ones(1, 3)
    unclamped = _surrogate(backend, device, lp, old, adv, mask)
    assert float(unclamped["loss"]) == float("inf")  # what the clamp is for
    got = _surrogate(backend, device, lp, old, adv, mask, log_ratio_clamp=20.0)
    truth, _ = reference.clipped_surrogate(lp.double(), old.double(), adv.double(), mask, log_ratio_clamp=20.0)
    assert math.isfinite(float(got["loss"])) and abs(float(got["loss"]) / float(truth) - 1) < 1e-6
    assert got["grad"][0, 0] == 0 and torch.isfinite(got["grad"]).all()


@pytest.mark.parametrize("backend,device", LINEAR_PPO)
def test_linear_ppo_log_ratio_clamp_matches_the_reference(backend, device):
    hidden, weight, bias, targets, mask, lp = _linear_inputs()
    old, adv, ref = lp + 0.6 * torch.randn(lp.shape), torch.randn(lp.shape), lp + 0.3 * torch.randn(lp.shape)
    kw = dict(kl_coef=0.1, entropy_coef=0.01, log_ratio_clamp=0.3)
    got = _linear_ppo(backend, device, hidden, weight, bias, targets, old, adv, mask, ref, **kw)
    truth = _linear_ppo("reference", "cpu", hidden.double(), weight.double(), bias.double(), targets, old.double(),
                        adv.double(), mask, ref.double(), **kw)
    assert abs(float(got["loss"]) - float(truth["loss"])) <= 1e-5 * max(1.0, abs(float(truth["loss"])))
    for k in ("d_hidden", "d_weight", "d_bias"):
        assert rel_err(got[k].cpu(), truth[k]) < 1e-5, k
    for k in ("clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "pg_loss"):
        assert abs(float(got[k]) - float(truth[k])) <= 1e-5 * max(1.0, abs(float(truth[k]))), k


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "20"])
def test_log_ratio_clamp_validation_names_the_argument(bad):
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="log_ratio_clamp: expected None or a positive number"):
        ops.clipped_surrogate(lp, lp, lp, log_ratio_clamp=bad)
    hidden, weight, targets = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        ops.linear_ppo_loss(hidden, weight, targets, lp, lp, log_ratio_clamp=bad)


@pytest.mark.parametrize("backend,device", PPO)
def test_log_ratio_clamp_under_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    shape = (2, 9)
    lp = torch.rand(shape) * -3.0
    old, adv, mask = (lp + 0.6 * torch.randn(shape)).to(device), torch.randn(shape).to(device), _mask(shape).to(device)
    adv[0, 0] = 0.0
    old[0, 0] = float("-inf")

    def f(x):
        loss, stats = ops.clipped_surrogate(x, old, adv, mask, log_ratio_clamp=0.3, dual_clip=2.0)
        return loss, stats["approx_kl"]

    x = lp.clone().to(device).requires_grad_()
    with use_backend(backend):
        eager, kl = f(x)
        (g_eager,) = torch.autograd.grad(eager, x)
        out, kl_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        (g,) = torch.autograd.grad(out, x)
    assert torch.isfinite(out) and rel_err(out, eager) < 1e-6 and rel_err(g, g_eager) < 1e-6
    assert rel_err(kl_c, kl) < 1e-6
