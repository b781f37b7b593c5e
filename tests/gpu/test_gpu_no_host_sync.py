"""The fused ops never synchronize the host with the GPU (the issue's "no host syncs"): every public op, forward
and backward, runs under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any blocking call
(``.item()``, ``.cpu()``, ``bool(tensor)``, ``nonzero``, a synchronizing copy).

The first call of each op runs outside the mode: autotuning benchmarks configs and the one-time cuBLAS capability
check reads a result, both by design once per shape. The scenarios are a plain function of the device, so
tests/ops/test_sync_scenarios.py runs the same code on the CPU and keeps it from rotting between GPU runs.
"""
import pytest
import torch

import signalrl.ops as ops

_IGN = -100


def _scenarios(device: torch.device) -> dict:
    """name -> closure running one op forward and backward on ``device`` (fresh leaves each call)."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T, V, H = 4, 96, 1000, 64
    N = B * T

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    targets[:, :8] = _IGN
    logits = randn(B, T, V, dtype=torch.bfloat16)
    hidden = randn(B, T, H, dtype=torch.bfloat16)
    weight = (randn(V, H) / H**0.5).to(torch.bfloat16)
    lp, old, ref, adv = randn(B, T), randn(B, T), randn(B, T), randn(B, T)
    mask = torch.rand(B, T, device=device, generator=g) > 0.2
    values, returns = randn(B, T), randn(B, T)

    def leaf(x):
        return x.detach().clone().requires_grad_()

    def token():
        x = leaf(logits)
        a, e = ops.token_logprobs(x, targets, return_entropy=True)
        (a.sum() + e.sum()).backward()

    def linear(train_head):
        def run():
            h, w = leaf(hidden), (leaf(weight) if train_head else weight)
            a, e = ops.linear_token_logprobs(h, w, targets, return_entropy=True)
            (a.sum() + 0.1 * e.sum()).backward()
        return run

    def linear_ppo(train_head):
        def run():
            h, w = leaf(hidden), (leaf(weight) if train_head else weight)
            loss, _stats = ops.linear_ppo_loss(h, w, targets, old, adv, mask, ref_logprobs=ref, kl_coef=0.05,
                                               entropy_coef=0.01, dual_clip=3.0)
            loss.backward()
        return run

    def surrogate():
        x = leaf(lp)
        loss, _stats = ops.clipped_surrogate(x, old, adv, mask, dual_clip=3.0)
        loss.backward()

    def value():
        x = leaf(values)
        loss, _stats = ops.value_loss(x, old, returns, mask, clip=0.2)
        loss.backward()

    def kl():
        x = leaf(lp)
        ops.kl_penalty(x, ref, "k3").sum().backward()

    def gae():
        ops.gae(randn(B, T), values, mask, gamma=0.99, lam=0.95)

    assert N > 256  # several row blocks in every kernel
    return {"token_logprobs": token, "linear_token_logprobs (trained head)": linear(True),
            "linear_token_logprobs (frozen head)": linear(False), "linear_ppo_loss (trained head)": linear_ppo(True),
            "linear_ppo_loss (frozen head)": linear_ppo(False), "clipped_surrogate": surrogate, "value_loss": value,
            "kl_penalty": kl, "gae": gae}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_ops_never_sync_the_host():
    """Fails with the op and the first line of torch's error ("called a synchronizing CUDA operation")."""
    device = torch.device("cuda")
    runs = _scenarios(device)
    for fn in runs.values():  # autotuning and one-time checks
        fn()
    torch.cuda.synchronize()
    failures = {}
    for name, fn in runs.items():
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            failures[name] = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not failures, failures
