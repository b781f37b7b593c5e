"""GPU benchmarks of the Triton GAE scan, the fused PPO token epilogue and the fused value loss.

    python -m benchmarks.gpu_ppo_gae [--out DIR] [--only SUBSTR] [--quick] [--dry-run]

benchmarks/gpu_check.sh runs the ``CASES`` here through benchmarks/gpu_logprobs.py; both use the harness of
benchmarks/gpu_harness.py (``Ctx``, the suite's timer and ceilings, the table). Run alone, this file measures
the ceilings and runs only its own cases. Bytes counted for "% copy BW" are the compulsory HBM traffic: every
input read once and every output written once (the GAE kernel's shifted re-reads of mask and values hit cache).

Cases:
- GAE (B=1024, T=8192, fp32, masked): Triton kernel and the public op vs the measured copy bandwidth, and
  vs the verl-style PyTorch loop over T (vectorized over rows, no mask) and the masked reference loop.
  Also many short rows (B=65536, T=128) and a few long rows (B=8, T=32768).
- PPO token epilogue (N = 4M tokens): ``ppo_token_fwd`` (loss + d logprobs + stats in one pass), with and
  without KL + entropy, and ``ops.clipped_surrogate`` fwd+bwd, vs the unfused PyTorch reference fwd+bwd.
- Value loss (N = 4M): ``value_loss_fwd`` and ``ops.value_loss`` fwd+bwd vs the PyTorch reference.
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _verl_style_gae(rewards, values, gamma, lam):
    """The loop over T that verl/TRL run today (vectorized over rows, no mask): ~6 launches per step."""
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def bench_gae(ctx) -> list[dict]:
    """GAE reverse scan: % of measured copy bandwidth and speed-up over the PyTorch loop over T."""
    import signalrl.ops as ops
    from signalrl import reference
    from signalrl.kernels.gae import gae_fwd

    rows = []
    shapes = ctx.pick([(1024, 8192)] if ctx.quick else [(1024, 8192), (65536, 128), (8, 32768)], [(4, 40)])
    for i, (B, T) in enumerate(shapes):
        g = torch.Generator(device=ctx.device).manual_seed(i)
        r = torch.randn(B, T, device=ctx.device, generator=g)
        v = torch.randn(B, T, device=ctx.device, generator=g)
        lengths = torch.randint(T // 2, T + 1, (B, 1), device=ctx.device, generator=g)
        m_bool = torch.arange(T, device=ctx.device)[None, :] < lengths
        m = m_bool.float()
        last = torch.zeros(B, device=ctx.device)
        shape = f"B={B} T={T} fp32"
        bytes_moved = B * T * 4 * 5  # rewards, values, mask read; advantages, returns written
        gae_fwd(r, v, m, last, 0.99, 0.95)  # compile + autotune outside the timings
        ms = ctx.time_ms(lambda: gae_fwd(r, v, m, last, 0.99, 0.95))
        rows.append(ctx.row("gae Triton kernel", shape, ms, pct_copy=100 * bytes_moved / (ms * 1e-3) / 1e9 / ctx.copy_gbps,
                            notes="f32 mask; reads 3, writes 2 [B,T] f32"))
        m_u8 = m_bool.view(torch.uint8)
        bytes_u8 = B * T * (4 * 4 + 1)
        gae_fwd(r, v, m_u8, last, 0.99, 0.95)
        ms_u8 = ctx.time_ms(lambda: gae_fwd(r, v, m_u8, last, 0.99, 0.95))
        rows.append(ctx.row("gae Triton kernel, 1-byte mask", shape, ms_u8,
                            pct_copy=100 * bytes_u8 / (ms_u8 * 1e-3) / 1e9 / ctx.copy_gbps,
                            notes="what ops.gae passes for a bool mask"))

        def op():
            with ops.use_backend("triton"):
                return ops.gae(r, v, m_bool, gamma=0.99, lam=0.95, last_values=last)

        op()
        ms_op = ctx.time_ms(op)
        rows.append(ctx.row("ops.gae fwd (bool mask)", shape, ms_op,
                            pct_copy=100 * bytes_u8 / (ms_op * 1e-3) / 1e9 / ctx.copy_gbps))
        if T <= 8192 or ctx.dry_run:
            ms_loop = ctx.time_ms(lambda: _verl_style_gae(r, v, 0.99, 0.95), warmup=1, rep=1)
            rows.append(ctx.row("verl-style torch loop over T (no mask)", shape, ms_loop, vs="gae Triton kernel",
                                speedup=ms_loop / ms))
            ms_ref = ctx.time_ms(lambda: reference.gae(r, v, m_bool, gamma=0.99, lam=0.95, last_values=last),
                                 warmup=1, rep=1)
            rows.append(ctx.row("reference torch loop over T (masked)", shape, ms_ref, vs="gae Triton kernel",
                                speedup=ms_ref / ms))
        del r, v, m, m_bool
        ctx.free()
    return rows


def _ppo_inputs(ctx, N, dtype, seed=0):
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    lp = (torch.rand(N, device=ctx.device, generator=g) * -4).to(dtype)
    old = (lp.float() + 0.3 * torch.randn(N, device=ctx.device, generator=g)).to(dtype)
    ref = (lp.float() + 0.3 * torch.randn(N, device=ctx.device, generator=g)).to(dtype)
    adv = torch.randn(N, device=ctx.device, generator=g)
    ent = torch.rand(N, device=ctx.device, generator=g) * 3
    m = (torch.rand(N, device=ctx.device, generator=g) > 0.1).float()
    return lp, old, ref, adv, ent, m


def bench_ppo_epilogue(ctx) -> list[dict]:
    """Fused PPO token epilogue (loss, d logprobs, stats in one pass) vs the unfused PyTorch surrogate."""
    import signalrl.ops as ops
    from signalrl import reference
    from signalrl.kernels import ppo as K

    rows = []
    B, T = ctx.pick((512, 8192), (4, 50))
    N = B * T
    for dtype in ([torch.float32] if ctx.quick else [torch.float32, torch.bfloat16]):
        lp, old, ref, adv, ent, m = _ppo_inputs(ctx, N, dtype)
        w = m / m.sum()
        e = lp.element_size()
        shape = f"N={N} {str(dtype).replace('torch.', '')}"

        def pct(nbytes, ms):
            return 100 * nbytes / (ms * 1e-3) / 1e9 / ctx.copy_gbps

        def fused():
            return K.ppo_token_fwd(lp, old, adv, w, m, None, None, 0.2, 0.28, 3.0, "k3", 0.0, 0.0)

        def fused_kl_ent():
            return K.ppo_token_fwd(lp, old, adv, w, m, ref, ent, 0.2, 0.28, 3.0, "k3", 0.05, 0.01)

        fused()
        fused_kl_ent()
        ms = ctx.time_ms(fused)
        rows.append(ctx.row("ppo_token_fwd (surrogate + grad + stats)", shape, ms,
                            pct_copy=pct(N * (2 * e + 4 * 3 + 4), ms),
                            notes="reads lp, old, A, w, mask; writes d lp"))
        ms_k = ctx.time_ms(fused_kl_ent)
        rows.append(ctx.row("ppo_token_fwd + KL(k3) + entropy", shape, ms_k,
                            pct_copy=pct(N * (3 * e + 4 * 4 + 4 * 2), ms_k)))

        lp2, adv2, old2, m2 = lp.reshape(B, T), adv.reshape(B, T), old.reshape(B, T), m.reshape(B, T)
        x = lp2.clone().requires_grad_()

        def op_fwd_bwd():
            with ops.use_backend("triton"):
                loss, stats = ops.clipped_surrogate(x, old2, adv2, m2, clip_high=0.28, dual_clip=3.0)
            return torch.autograd.grad(loss, x), stats

        def torch_fwd_bwd():
            loss, stats = reference.clipped_surrogate(x, old2, adv2, m2, clip_high=0.28, dual_clip=3.0)
            return torch.autograd.grad(loss, x), stats

        op_fwd_bwd()
        ms_op = ctx.time_ms(op_fwd_bwd)
        rows.append(ctx.row("ops.clipped_surrogate fwd+bwd", shape, ms_op, notes="includes token weights"))
        ms_t = ctx.time_ms(torch_fwd_bwd, warmup=5, rep=50)
        rows.append(ctx.row("torch reference surrogate fwd+bwd + stats", shape, ms_t,
                            vs="ops.clipped_surrogate fwd+bwd", speedup=ms_t / ms_op))
        del lp, old, ref, adv, ent, m, w, x
        ctx.free()
    return rows


def bench_value_loss(ctx) -> list[dict]:
    """Fused clipped value loss (loss, d values, explained variance in one pass) vs the PyTorch reference."""
    import signalrl.ops as ops
    from signalrl import reference
    from signalrl.kernels import ppo as K

    B, T = ctx.pick((512, 8192), (4, 50))
    N = B * T
    g = torch.Generator(device=ctx.device).manual_seed(3)
    v = torch.randn(B, T, device=ctx.device, generator=g)
    old = v + 0.3 * torch.randn(B, T, device=ctx.device, generator=g)
    ret = v + torch.randn(B, T, device=ctx.device, generator=g)
    m = (torch.rand(B, T, device=ctx.device, generator=g) > 0.1).float()
    w = (m / m.sum()).reshape(-1)
    shape = f"N={N} fp32"

    def fused():
        return K.value_loss_fwd(v.reshape(-1), old.reshape(-1), ret.reshape(-1), w, m.reshape(-1), 0.2)

    fused()
    ms = ctx.time_ms(fused)
    rows = [ctx.row("value_loss_fwd (loss + grad + stats)", shape, ms,
                    pct_copy=100 * N * 4 * 6 / (ms * 1e-3) / 1e9 / ctx.copy_gbps)]
    x = v.clone().requires_grad_()

    def op_fwd_bwd():
        with ops.use_backend("triton"):
            loss, stats = ops.value_loss(x, old, ret, m, clip=0.2)
        return torch.autograd.grad(loss, x), stats

    def torch_fwd_bwd():
        loss, stats = reference.value_loss(x, old, ret, m, clip=0.2)
        return torch.autograd.grad(loss, x), stats

    op_fwd_bwd()
    ms_op = ctx.time_ms(op_fwd_bwd)
    rows.append(ctx.row("ops.value_loss fwd+bwd", shape, ms_op))
    ms_t = ctx.time_ms(torch_fwd_bwd, warmup=5, rep=50)
    rows.append(ctx.row("torch reference value loss fwd+bwd + stats", shape, ms_t, vs="ops.value_loss fwd+bwd",
                        speedup=ms_t / ms_op))
    return rows


CASES = [bench_gae, bench_ppo_epilogue, bench_value_loss]


def main(argv=None) -> int:
    from benchmarks import gpu_harness

    return gpu_harness.main(CASES, stem="gpu_ppo_gae", title="PPO/GAE kernel benchmarks",
                            description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
