"""GPU kernel benchmarks of the log-prob kernels; with the GAE / PPO cases of ``gpu_ppo_gae.py``, what
benchmarks/gpu_check.sh runs.

    python -m benchmarks.gpu_logprobs [--out DIR] [--only SUBSTR] [--quick] [--dry-run]
    (or python benchmarks/gpu_logprobs.py ...)

Every figure is measured in the same run as the ceilings it is compared with: the device's copy bandwidth
(``dst.copy_(src)`` of 1 GiB, bytes read + written) and its bf16 matmul rate (``torch.mm`` 8192³). Times are medians
of CUDA-event timings with the L2 cache flushed before each call, peak memory is ``max_memory_allocated`` above the
start — both from the suite's :mod:`signalrl.bench.timing`, through ``benchmarks/gpu_harness.py``. Results: a JSON
file and a markdown table in ``--out`` (default benchmarks/results/), and a short table on stdout.

Adding a case is one function: ``def bench_<name>(ctx) -> list[dict]`` in this file (listed in ``CASES``) or in a
``benchmarks/gpu_<family>.py`` module whose ``CASES`` list ``main`` below adds. Build each row with
``ctx.row(case, shape, time_ms, **fields)``; useful fields: ``pct_matmul`` / ``pct_copy`` (of the measured ceilings,
see ``ctx.matmul_tflops`` / ``ctx.copy_gbps``), ``extra_mem_mb``, ``vs`` + ``speedup``, ``notes``. ``ctx.time_ms(fn)``
times a callable, ``ctx.peak_extra(fn, keep_bytes)`` measures the peak bytes it allocates beyond its outputs,
``ctx.pick(big, small)`` chooses the shape (``small`` under ``--dry-run``: CPU, Triton interpreter, tiny shapes,
timings meaningless — a check that the cases run). A case that raises is recorded as an error row; the others go on.
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_harness import Ctx  # noqa: E402

IGN = -100


def _linear_inputs(ctx, N, V, H, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    h = torch.randn(N, H, device=ctx.device, generator=g).to(dtype)
    w = (torch.randn(V, H, device=ctx.device, generator=g) * (2.0 / H**0.5)).to(dtype)
    t = torch.randint(0, V, (N,), device=ctx.device, generator=g)
    return h, w, t


def _torch_linear_logprobs(h, w, t):
    """Unfused PyTorch: bf16 logits, float32 log_softmax, gather (what the fused kernels replace)."""
    logits = h @ w.t()
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(1, t[:, None])[:, 0]


def bench_linear_token_logprobs(ctx: Ctx) -> list[dict]:
    """linear token log-probs fwd+bwd vs the bf16 matmul rate (4 GEMM-equivalents of 2·N·V·H) and extra memory."""
    from signalrl.kernels import linear_logprobs as LL
    from signalrl.kernels import linear_logprobs_bwd as LLB

    rows = []
    H, V = ctx.pick(4096, 64), ctx.pick(128256, 1000)
    Ns = ctx.pick([8192] if ctx.quick else [8192, 16384], [64])
    for N in Ns:
        h, w, t = _linear_inputs(ctx, N, V, H)
        g_lp = torch.ones(N, device=ctx.device)
        empty = torch.empty(0, device=ctx.device)
        shape = f"N={N} V={V} H={H} bf16"
        flops = 2 * N * V * H

        def fwd():
            return LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, False)

        def fwd_bwd():
            lp, _, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, False)
            return LL.linear_token_logprobs_bwd(g_lp, empty, h, w, None, t, lse, empty, 1.0, IGN, True, True, False)

        def fwd_bwd_entropy():
            lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)
            return LL.linear_token_logprobs_bwd(g_lp, g_lp, h, w, None, t, lse, ent, 1.0, IGN, True, True, False)

        fwd_bwd()  # compile + autotune outside the timings
        ms_f = ctx.time_ms(fwd)
        ms = ctx.time_ms(fwd_bwd)
        ms_e = ctx.time_ms(fwd_bwd_entropy)
        extra = ctx.peak_extra(fwd_bwd, keep_bytes=h.numel() * 2 + w.numel() * 2)
        logits_bytes = N * V * 4
        mem = {} if extra is None else dict(extra_mem_mb=extra / 2**20, extra_mem_pct_logits=100 * extra / logits_bytes)
        rows.append(ctx.row("linear_token_logprobs fwd", shape, ms_f,
                            pct_matmul=100 * flops / (ms_f * 1e-3) / 1e12 / ctx.matmul_tflops))
        rows.append(ctx.row("linear_token_logprobs fwd+bwd", shape, ms,
                            pct_matmul=100 * 4 * flops / (ms * 1e-3) / 1e12 / ctx.matmul_tflops, **mem,
                            notes="4 GEMM-equivalents; extra memory beyond inputs and d(hidden), d(weight)"))
        rows.append(ctx.row("linear_token_logprobs+entropy fwd+bwd", shape, ms_e,
                            pct_matmul=100 * 4 * flops / (ms_e * 1e-3) / 1e12 / ctx.matmul_tflops))

        def fwd_bwd_frozen():  # a frozen LM head (LoRA): d(hidden) only, the row-major backward
            lp, _, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, False)
            return LL.linear_token_logprobs_bwd(g_lp, empty, h, w, None, t, lse, empty, 1.0, IGN, True, False, False)

        fwd_bwd_frozen()
        ms_fz = ctx.time_ms(fwd_bwd_frozen)
        extra_fz = ctx.peak_extra(fwd_bwd_frozen, keep_bytes=h.numel() * 2)
        plan = LL.backward_plan(N, V, H, w.element_size(), False, True, False, False)
        rows.append(ctx.row(
            "linear_token_logprobs fwd+bwd, frozen head", shape, ms_fz,
            pct_matmul=100 * 3 * flops / (ms_fz * 1e-3) / 1e12 / ctx.matmul_tflops,
            **({} if extra_fz is None else dict(extra_mem_mb=extra_fz / 2**20,
                                               extra_mem_pct_logits=100 * extra_fz / logits_bytes)),
            notes=f"3 GEMM-equivalents; row chunks of {plan.rows}, bound {plan.extra_bytes / 2**20:.0f} MiB"))
        if ctx.cuda and LLB._DH_GEMM == "auto":  # the two d(hidden) accumulation paths, for choosing the default
            cublas = LL._cublas_f32_accumulate_ok(ctx.device.index or 0)
            LLB._DH_GEMM = "triton"
            try:
                fwd_bwd()
                ms_tr = ctx.time_ms(fwd_bwd)
            finally:
                LLB._DH_GEMM = "auto"
            rows.append(ctx.row("linear_token_logprobs fwd+bwd, Triton dH GEMM", shape, ms_tr,
                                pct_matmul=100 * 4 * flops / (ms_tr * 1e-3) / 1e12 / ctx.matmul_tflops,
                                notes=f"default path uses {'cuBLAS' if cublas else 'Triton'} for dH"))

        # unfused PyTorch baseline (materialized logits)
        hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

        def torch_fwd_bwd():
            lp = _torch_linear_logprobs(hr, wr, t)
            return torch.autograd.grad(lp.sum(), (hr, wr))

        try:
            ms_t = ctx.time_ms(torch_fwd_bwd, warmup=5, rep=20)
            extra_t = ctx.peak_extra(torch_fwd_bwd, keep_bytes=h.numel() * 2 + w.numel() * 2)
            rows.append(ctx.row("torch unfused logprobs fwd+bwd", shape, ms_t, vs="linear_token_logprobs fwd+bwd",
                                speedup=ms_t / ms,
                                **({} if extra_t is None else dict(extra_mem_mb=extra_t / 2**20,
                                                                   extra_mem_pct_logits=100 * extra_t / logits_bytes))))
        except torch.OutOfMemoryError:
            rows.append(ctx.row("torch unfused logprobs fwd+bwd", shape, None, notes="out of memory"))
        del hr, wr
        ctx.free()
        rows.extend(_third_party_linear_ce(ctx, h, w, t, shape, ms))
        del h, w, t
        ctx.free()
    return rows


def bench_linear_backward_breakdown(ctx: Ctx) -> list[dict]:
    """Where the linear backward's time goes (N=8192): forward tile kernel, gradient-chunk kernel, d W GEMM, d H GEMM;
    each as % of the bf16 matmul rate for its 2·N·V·H flops, plus the autotuned configs."""
    from signalrl.kernels import linear_logprobs as LL

    N, H, V = ctx.pick(8192, 64), ctx.pick(4096, 64), ctx.pick(128256, 1000)
    h, w, t = _linear_inputs(ctx, N, V, H)
    shape = f"N={N} V={V} H={H} bf16"
    flops = 2 * N * V * H
    g_lp = torch.ones(N, device=ctx.device)
    lp, ent, lse = LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)
    LL.linear_token_logprobs_bwd(g_lp, g_lp, h, w, None, t, lse, ent, 1.0, IGN, True, True, False)  # tune
    vc = LL.backward_plan(N, V, H, w.element_size(), False, True, True, False).cols  # vocab-major: both grads
    G = torch.empty(N, vc, dtype=w.dtype, device=ctx.device)
    gw = torch.empty_like(w)
    gh = torch.zeros(N, H, dtype=torch.float32, device=ctx.device)
    flags = dict(HAS_BIAS=False, WITH_ENTROPY=True, HAS_SCALE=False, NEED_BIAS=False, DOT_F32=not ctx.cuda,
                 GROUP_N=LL._GROUP_N)

    def grad_chunks():
        for c0 in range(0, V, vc):
            args = (h, w, h, t, lse, g_lp, g_lp, ent, lse, G, lse, N, V, H, min(LL.next_pow2(N), 8192), c0, vc, 1.0,
                    IGN)
            LL._launch(LL._grad_chunk_kernel, LL._grad_chunk_tuned,
                       lambda meta: (LL.cdiv(N, meta["BLOCK_N"]) * LL.cdiv(vc, meta["BLOCK_V"]),), args, flags,
                       N * vc * H, (LL._INTERP_TILE, {}) if not ctx.cuda else LL._SMALL_TILE)

    def dw_gemms():
        for c0 in range(0, V, vc):
            width = min(vc, V - c0)
            torch.mm(G[:, :width].t(), h, out=gw[c0:c0 + width])

    def dh_gemms():
        for c0 in range(0, V, vc):
            width = min(vc, V - c0)
            LL._acc_matmul(gh, G[:, :width], w[c0:c0 + width])

    rows = []
    for name, fn in [("fwd tile kernel (+merge)", lambda: LL.linear_token_logprobs_fwd(h, w, None, t, 1.0, IGN, True)),
                     ("bwd gradient-chunk kernels", grad_chunks), ("bwd d W GEMMs (cuBLAS)", dw_gemms),
                     ("bwd d H GEMMs (" + ("cuBLAS" if ctx.cuda and LL._cublas_f32_accumulate_ok(ctx.device.index or 0)
                                           else "Triton") + ")", dh_gemms)]:
        ms = ctx.time_ms(fn)
        rows.append(ctx.row("breakdown: " + name, shape, ms, pct_matmul=100 * flops / (ms * 1e-3) / 1e12
                            / ctx.matmul_tflops))
    if ctx.cuda:
        cfg = {k: getattr(getattr(LL, k), "best_config", None)
               for k in ("_lse_partial_tuned", "_grad_chunk_tuned", "_acc_matmul_tuned")}
        rows[-1]["notes"] = "; ".join(f"{k.strip('_')}: {v}" for k, v in cfg.items())
    del h, w, t, G, gw, gh
    ctx.free()
    return rows


def _cce_loss():
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def _liger_loss():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def _third_party_linear_ce(ctx, h, w, t, shape, ms_ours) -> list[dict]:
    """Liger-Kernel fused linear cross entropy and Cut Cross-Entropy, when installed (per-token CE = −log-prob).

    Two tasks each. ``per-token`` is linear_token_logprobs' own: per-token losses (``reduction="none"``) under a
    random per-token upstream gradient, the gradient unknown until the backward. ``scalar`` is ``reduction="sum"``,
    a cheaper task: the upstream gradient is one number, so a peer may form the gradients during the forward
    (Liger does)."""
    rows = []
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    g_tok = torch.randn(t.shape, device=h.device, generator=torch.Generator(h.device).manual_seed(7))
    for name, load in (("cut-cross-entropy", _cce_loss), ("liger fused linear CE", _liger_loss)):
        try:
            loss_fn = load()
        except ImportError:
            loss_fn = None
        for task, reduction in (("per-token", "none"), ("scalar (sum)", "sum")):
            case = f"{name} fwd+bwd, {task}"
            if loss_fn is None:
                rows.append(ctx.row(case, shape, None, notes="not installed"))
                continue

            def step(loss_fn=loss_fn, reduction=reduction):
                loss = loss_fn(hr, wr, t, reduction=reduction)
                return torch.autograd.grad(loss, (hr, wr), g_tok if reduction == "none" else None)

            try:
                ms = ctx.time_ms(step, warmup=5, rep=20)
                rows.append(ctx.row(case, shape, ms, vs="linear_token_logprobs fwd+bwd", speedup=ms / ms_ours))
            except Exception as e:  # noqa: BLE001 - a third-party failure must not stop the run
                rows.append(ctx.row(case, shape, None, notes=f"error: {e!r}"[:200]))
    return rows


def bench_token_logprobs(ctx: Ctx) -> list[dict]:
    """token log-probs (+ entropy) from logits as % of the measured copy bandwidth."""
    from signalrl.kernels import logprobs as TL

    rows = []
    N, V = ctx.pick(8192, 64), ctx.pick(128256, 1000)
    for dtype in ([torch.bfloat16] if ctx.quick else [torch.bfloat16, torch.float32]):
        x = (torch.randn(N, V, device=ctx.device) * 3).to(dtype)
        t = torch.randint(0, V, (N,), device=ctx.device)
        e = x.element_size()
        shape = f"N={N} V={V} {str(dtype).replace('torch.', '')}"
        lp, ent, lse = TL.token_logprobs_fwd(x, t, 1.0, IGN, True)
        g = torch.ones(N, device=ctx.device)
        empty = torch.empty(0, device=ctx.device)

        def pct(bytes_moved, ms):
            return 100 * bytes_moved / (ms * 1e-3) / 1e9 / ctx.copy_gbps

        ms = ctx.time_ms(lambda: TL.token_logprobs_fwd(x, t, 1.0, IGN, True))
        rows.append(ctx.row("token_logprobs+entropy fwd", shape, ms, pct_copy=pct(N * V * e, ms)))
        ms = ctx.time_ms(lambda: TL.token_logprobs_fwd(x, t, 1.0, IGN, False))
        rows.append(ctx.row("token_logprobs fwd", shape, ms, pct_copy=pct(N * V * e, ms)))
        ms = ctx.time_ms(lambda: TL.token_logprobs_bwd(g, g, x, t, lse, ent, 1.0, IGN))
        rows.append(ctx.row("token_logprobs+entropy bwd", shape, ms, pct_copy=pct(2 * N * V * e, ms),
                            notes="reads logits, writes d(logits)"))
        y = x.clone()
        ms = ctx.time_ms(lambda: TL.token_logprobs_bwd_inplace(g, empty, y, t, lse, empty, 1.0, IGN))
        rows.append(ctx.row("token_logprobs bwd in place", shape, ms, pct_copy=pct(2 * N * V * e, ms),
                            notes="values meaningless after the first call; timing only"))
        del y

        def torch_fwd():
            logp = torch.log_softmax(x.float(), -1)
            return logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

        try:
            ms_t = ctx.time_ms(torch_fwd, warmup=5, rep=20)
            rows.append(ctx.row("torch log_softmax+gather+entropy fwd", shape, ms_t, pct_copy=pct(N * V * e, ms_t),
                                vs="token_logprobs+entropy fwd", speedup=ms_t / rows[-4]["time_ms"]))
        except torch.OutOfMemoryError:
            rows.append(ctx.row("torch log_softmax+gather+entropy fwd", shape, None, notes="out of memory"))
        del x, t, lp, ent, lse
        ctx.free()
    return rows


def bench_linear_ppo_loss(ctx: Ctx) -> list[dict]:
    """linear_ppo_loss (fused) vs the unfused composition: materialized logits → log_softmax → gather → surrogate."""
    import signalrl.ops as ops
    from signalrl import reference

    B, T = ctx.pick((8, 1024), (2, 16))
    H, V = ctx.pick(4096, 64), ctx.pick(128256, 1000)
    N = B * T
    h, w, t = _linear_inputs(ctx, N, V, H, seed=7)
    h = h.reshape(B, T, H).requires_grad_()
    w.requires_grad_()
    t = t.reshape(B, T)
    with torch.no_grad():
        lp0 = _torch_linear_logprobs(h.reshape(N, H), w, t.reshape(N)).reshape(B, T)
    old = lp0 + 0.2 * torch.randn_like(lp0)
    ref = lp0 + 0.2 * torch.randn_like(lp0)
    adv = torch.randn_like(lp0)
    mask = (torch.rand_like(lp0) > 0.1).float()
    kw = dict(kl_coef=0.05, entropy_coef=0.01)
    shape = f"B={B} T={T} V={V} H={H} bf16"
    grads_bytes = h.numel() * 2 + w.numel() * 2

    def fused():
        loss, stats = ops.linear_ppo_loss(h, w, t, old, adv, mask, ref_logprobs=ref, **kw)
        return torch.autograd.grad(loss, (h, w))

    def unfused():
        logits = h.reshape(N, H) @ w.t()
        logp_all = torch.log_softmax(logits.float(), -1)
        lp = logp_all.gather(1, t.reshape(N, 1))[:, 0].reshape(B, T)
        ent = -(logp_all.exp() * logp_all).sum(-1).reshape(B, T)
        pg, _ = reference.clipped_surrogate(lp, old, adv, mask)
        loss = pg + kw["kl_coef"] * reference.aggregate(reference.kl_penalty(lp, ref), mask) \
            - kw["entropy_coef"] * reference.aggregate(ent, mask)
        return torch.autograd.grad(loss, (h, w))

    fused()
    ms_f = ctx.time_ms(fused)
    ex_f = ctx.peak_extra(fused, grads_bytes)
    rows = [ctx.row("linear_ppo_loss fused fwd+bwd", shape, ms_f,
                    pct_matmul=100 * 4 * 2 * N * V * H / (ms_f * 1e-3) / 1e12 / ctx.matmul_tflops,
                    **({} if ex_f is None else dict(extra_mem_mb=ex_f / 2**20,
                                                    extra_mem_pct_logits=100 * ex_f / (N * V * 4))))]
    try:
        ms_u = ctx.time_ms(unfused, warmup=5, rep=20)
        ex_u = ctx.peak_extra(unfused, grads_bytes)
        fields = dict(vs="linear_ppo_loss fused fwd+bwd", speedup=ms_u / ms_f)
        if ex_u is not None:
            fields.update(extra_mem_mb=ex_u / 2**20, extra_mem_pct_logits=100 * ex_u / (N * V * 4),
                          notes=f"fused extra memory = {100 * ex_f / ex_u:.2f} % of unfused "
                                f"({100 * (ex_f + grads_bytes) / (ex_u + grads_bytes):.1f} % counting the gradients)")
        rows.append(ctx.row("unfused composition fwd+bwd", shape, ms_u, **fields))
    except torch.OutOfMemoryError:
        rows.append(ctx.row("unfused composition fwd+bwd", shape, None, notes="out of memory"))
    return rows


CASES = [bench_token_logprobs, bench_linear_token_logprobs, bench_linear_backward_breakdown, bench_linear_ppo_loss]


def main(argv=None) -> int:
    from benchmarks import gpu_harness, gpu_ppo_gae

    return gpu_harness.main(CASES + gpu_ppo_gae.CASES, stem="gpu_logprobs", title="Kernel benchmarks",
                            description="GPU kernel benchmarks: log-prob kernels, GAE, PPO epilogue, value loss.",
                            argv=argv)


if __name__ == "__main__":
    sys.exit(main())
