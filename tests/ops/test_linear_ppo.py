"""linear_ppo_loss on every backend available here, against the reference composition in float64.

Ground truth: signalrl.reference.linear_ppo_loss (linear_token_logprobs → kl_penalty → clipped_surrogate) on float64
copies of the inputs; values, statistics and gradients of hidden, weight and bias.
"""
import pytest
import torch

import signalrl.ops as ops
from signalrl import reference
from signalrl.ops import SignalCheckError, check_mode, use_backend

from ._oracle import assert_close, backend_params, break_kernel, off_ratio_bounds, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter warns on masked lanes

PARAMS = backend_params("linear_ppo_fwd")
IGN = -100
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _inputs(B, T, H, V, dtype, device, bias=False, ref=True, mask=True, wscale=2.0):
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) * (wscale / H**0.5)).to(dtype)
    targets = torch.randint(0, V, (B, T))
    targets[torch.rand(B, T) < 0.15] = IGN
    # old/ref log-probs near the current ones so ratios straddle the clip range
    with torch.no_grad():
        lp = reference.linear_token_logprobs(hidden.double(), weight.double(), targets).float()
    old = off_ratio_bounds(lp, lp + 0.3 * torch.randn(B, T))
    refl = lp + 0.3 * torch.randn(B, T) if ref else None
    adv = torch.randn(B, T)
    m = (torch.rand(B, T) > 0.2).float() if mask else None
    b = torch.randn(V).to(dtype) if bias else None

    def dev(x):
        return None if x is None else x.to(device)

    return dict(hidden=dev(hidden), weight=dev(weight), targets=dev(targets), old=dev(old), adv=dev(adv),
                mask=dev(m), bias=dev(b), ref=dev(refl))


def _call(backend, inp, dtype=None, **kw):
    leaves = {k: inp[k].detach().clone().to(dtype or inp[k].dtype).requires_grad_()
              for k in ("hidden", "weight", "bias") if inp[k] is not None}
    ref = inp["ref"]
    if dtype == torch.float64 and ref is not None:
        ref = ref.double()
    with use_backend(backend):
        loss, stats = ops.linear_ppo_loss(
            leaves["hidden"], leaves["weight"], inp["targets"],
            inp["old"].double() if dtype == torch.float64 else inp["old"],
            inp["adv"].double() if dtype == torch.float64 else inp["adv"],
            inp["mask"], bias=leaves.get("bias"), ref_logprobs=ref, **kw,
        )
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss, stats, dict(zip(leaves.keys(), grads))


def _compare(backend, inp, dtype, **kw):
    loss, stats, grads = _call(backend, inp, **kw)
    t_loss, t_stats, t_grads = _call("reference", inp, dtype=torch.float64, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert list(stats) == list(t_stats), (list(stats), list(t_stats))
    # the loss is a sum of O(1) terms (A ~ N(0, 1), ρ ≈ 1) that can cancel: judge it against that scale
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - t_loss.item()) <= tol * max(1.0, abs(t_loss.item())), (loss.item(), t_loss.item())
    for k in stats:
        # near-zero statistics (e.g. a KL of ~1e-9): compare absolutely
        if (stats[k].double() - t_stats[k]).abs().item() > 1e-6:
            assert_close(f"stat {k}", stats[k], t_stats[k], dtype)
    for k in grads:
        assert grads[k].dtype == inp[k].dtype
        assert_close(f"d {k}", grads[k], t_grads[k], dtype)
    return loss, stats, grads


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_linear_ppo_aggregations_fp32(backend, device, aggregation):
    inp = _inputs(3, 7, 32, 300, torch.float32, device)
    _compare(backend, inp, torch.float32, aggregation=aggregation, kl_coef=0.05, entropy_coef=0.01)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ppo_full_options(backend, device, dtype):
    """bias, temperature, dual clip, asymmetric clip, KL and entropy terms, odd shapes."""
    inp = _inputs(2, 9, 48, 1031, dtype, device, bias=True)
    _compare(backend, inp, dtype, temperature=0.8, clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1,
             kl_estimator="k3", entropy_coef=0.02)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "abs"])
def test_linear_ppo_kl_estimators(backend, device, kl_estimator):
    inp = _inputs(2, 5, 16, 200, torch.float32, device)
    _compare(backend, inp, torch.float32, kl_coef=0.2, kl_estimator=kl_estimator)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_linear_ppo_no_ref_no_mask_and_flat_input(backend, device):
    inp = _inputs(1, 11, 16, 200, torch.float32, device, ref=False, mask=False)
    loss, stats, _ = _compare(backend, inp, torch.float32, kl_coef=0.5)
    assert stats["kl"].item() == 0.0
    flat = {k: (v[0] if k != "weight" and k != "bias" and v is not None else v) for k, v in inp.items()}
    loss_flat, _, _ = _call(backend, flat)  # [N, H] is one row
    assert rel_err(loss_flat, loss) < 1e-6


@pytest.mark.parametrize("backend,device", PARAMS)
def test_linear_ppo_zero_kl_coef_drops_an_infinite_kl(backend, device):
    """kl_coef=0 with ref_logprobs given: the KL term is absent from the loss and gradients, as in the reference
    (not 0·inf = NaN where the reference policy gave a counted token probability 0); the kl stat reports it."""
    inp = _inputs(2, 6, 16, 120, torch.float32, device, mask=False)
    inp["ref"] = inp["ref"].clone()
    inp["ref"][0, 1] = float("-inf")
    inp["targets"][0, 1] = 5  # counted
    loss, stats, grads = _compare_finite(backend, inp)
    assert stats["kl"].item() == float("inf")


def _compare_finite(backend, inp):
    loss, stats, grads = _call(backend, inp, kl_coef=0.0, kl_estimator="k1")
    t_loss, _, t_grads = _call("reference", inp, dtype=torch.float64, kl_coef=0.0, kl_estimator="k1")
    assert torch.isfinite(loss) and abs(loss.item() - t_loss.item()) <= 1e-5 * max(1.0, abs(t_loss.item()))
    for k in grads:
        assert torch.isfinite(grads[k]).all(), k
        assert_close(f"d {k}", grads[k], t_grads[k], torch.float32)
    return loss, stats, grads


@pytest.mark.parametrize("backend,device", PARAMS)
def test_linear_ppo_all_masked_and_length_one(backend, device):
    inp = _inputs(2, 3, 16, 100, torch.float32, device)
    inp["mask"] = torch.zeros_like(inp["old"])
    loss, stats, grads = _call(backend, inp, kl_coef=0.1, entropy_coef=0.1)
    assert loss.item() == 0.0 and all(torch.isfinite(s) for s in stats.values())
    assert stats["ratio_min"].item() == 0.0 and stats["ratio_max"].item() == 0.0
    assert all((g == 0).all() for g in grads.values())
    one = _inputs(1, 1, 16, 100, torch.float32, device)
    one["targets"].fill_(3)
    _compare(backend, one, torch.float32, entropy_coef=0.1)


@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.values[0] != "reference"])
def test_linear_ppo_check_mode_and_wrong_kernel(backend, device, monkeypatch):
    inp = _inputs(2, 4, 16, 150, torch.float32, device, bias=True)
    with check_mode():
        _call(backend, inp, kl_coef=0.1, entropy_coef=0.05)  # values and gradients checked against float64

    from signalrl.ops import linear_ppo as mod

    # the backward of the plain plan and of the native kept-logits plan (which this small call takes)
    for kernel in (mod.LINEAR_PPO_BWD, mod.LINEAR_KEPT_BWD):
        break_kernel(monkeypatch, kernel, lambda args, out: (out[0] * 1.01, out[1], out[2]))
    # with the entropy and KL terms every counted token has a gradient: the surrogate alone can have none (all of
    # a few tokens clipped), and then a 1 % error of nothing is nothing to catch
    with check_mode(), pytest.raises(SignalCheckError, match="gradient"):
        _call(backend, inp, kl_coef=0.1, entropy_coef=0.05)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_linear_ppo_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    inp = _inputs(2, 4, 16, 130, torch.float32, device)
    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()

    def f(h, w):
        loss, stats = ops.linear_ppo_loss(h, w, inp["targets"], inp["old"], inp["adv"], inp["mask"],
                                          ref_logprobs=inp["ref"], kl_coef=0.1, entropy_coef=0.01)
        return loss, stats["clip_fraction"]

    with use_backend(backend):
        eager, cf = f(h, w)
        g_eager = torch.autograd.grad(eager, (h, w))
        out, cf_c = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w)
        g = torch.autograd.grad(out, (h, w))
    assert rel_err(out, eager) < 1e-6 and rel_err(cf_c, cf) < 1e-6
    for a, b in zip(g, g_eager):
        assert rel_err(a, b) < 1e-6


def test_linear_ppo_validation_errors():
    h, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    t = torch.zeros(2, 3, dtype=torch.long)
    old, adv = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="weight: expected shape \\[V, 8\\]"):
        ops.linear_ppo_loss(h, torch.randn(10, 7), t, old, adv)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ops.linear_ppo_loss(h, w.bfloat16(), t, old, adv)
    with pytest.raises(ValueError, match="old_logprobs: expected shape \\(2, 3\\)"):
        ops.linear_ppo_loss(h, w, t, torch.zeros(3, 2), adv)
    with pytest.raises(ValueError, match="mask: expected shape"):
        ops.linear_ppo_loss(h, w, t, old, adv, torch.ones(6))
    with pytest.raises(ValueError, match="kl_estimator"):
        ops.linear_ppo_loss(h, w, t, old, adv, kl_estimator="k4")
    with pytest.raises(ValueError, match="aggregation"):
        ops.linear_ppo_loss(h, w, t, old, adv, aggregation="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        ops.linear_ppo_loss(h, w, t, old, adv, dual_clip=0.5)
    with pytest.raises(ValueError, match="temperature"):
        ops.linear_ppo_loss(h, w, t, old, adv, temperature=-1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        ops.linear_ppo_loss(h, w, t, old, adv, kl_coef=float("nan"))
