"""Every Triton kernel the Triton backend launches, compiled for sm_90 offline (no GPU), as the launchers call it.

The interpreter accepts code the real compiler rejects (a plain, non-constexpr global read inside ``@triton.jit``
once reached signalrl/kernels/ppo.py this way), so CPU CI compiles the kernels to a cubin with the ptxas that ships
in the triton wheel (tests/kernels/_offline_compile.py). The scenarios below call the public ops (backend forced to
triton) and the kernel launchers on CPU tensors with every launch intercepted, so argument types, pointer/size
divisibility, values specialized to 1, constexpr flags, warps and stages are exactly what a GPU launch would compile;
autotuned kernels are compiled with every config. All of it runs in ONE subprocess for this module.

Skipped on a CUDA machine (the GPU tests compile and run the kernels there) and where triton lacks the offline
compile API or ptxas.
"""
from __future__ import annotations

import os
import pathlib
import textwrap

import pytest

from _offline_compile import Case, run_offline, unavailable_reason

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

HERE = pathlib.Path(__file__).resolve()
KERNEL_MODULES = ("ppo", "kl", "gae", "linear_ppo", "logprobs", "linear_logprobs", "linear_logprobs_bwd")


# ------------------------------------------------------------------------------------------------ scenarios
# Run in the compile subprocess: kernel launches return at once, so outputs are garbage and shapes only need to be
# cheap for the torch work around the launches. Shapes: sizes divisible by 16 and odd ones (alignment is part of the
# specialization), one-program launches (ints equal to 1 become constexpr) and several programs.

_FLOATS = ("float32", "bfloat16", "float16")


def _t(*shape, dtype="float32", grad=False):
    import torch

    x = torch.randn(*shape).to(getattr(torch, dtype))
    return x.requires_grad_(grad)


def scenario_ppo_ops():
    """clipped_surrogate, value_loss, kl_penalty (fwd + bwd) through the op layer, every input dtype."""
    import torch

    from signalrl import ops

    with ops.use_backend("triton"):
        for dt in _FLOATS:
            # 1 program (P and blocks_per_prog specialized to 1) and, in float32, 3 programs of an odd size
            for shape in ((2, 24), (3, 1000)) if dt == "float32" else ((2, 24),):
                lp, old, adv = _t(*shape, dtype=dt), _t(*shape, dtype=dt), _t(*shape, dtype=dt)
                mask = torch.rand(shape) > 0.3
                for dual in (None, 3.0):
                    ops.clipped_surrogate(lp, old, adv, mask, dual_clip=dual)
                ops.clipped_surrogate(lp, old, adv, mask, log_ratio_clamp=20.0)  # the clamp path (HAS_LR_CLAMP)
                for clip in (None, 0.2):
                    ops.value_loss(lp, old, adv, mask, clip=clip)
                for est in ("k1", "k2", "k3", "abs") if dt == "float32" else ("k3",):
                    x = lp.detach().requires_grad_(True)
                    ops.kl_penalty(x, old, est).sum().backward()
        # mixed dtypes: each input is read in its own dtype
        lp, old, adv = _t(4, 33, dtype="bfloat16"), _t(4, 33), _t(4, 33, dtype="float16")
        ops.clipped_surrogate(lp, old, adv, dual_clip=2.0, aggregation="seq-mean-token-sum")
        ops.value_loss(lp, old, adv, clip=0.5)
        x = lp.detach().requires_grad_(True)
        ops.kl_penalty(x, old, "k3").sum().backward()


def scenario_ppo_kernels_persistent():
    """The kernel launchers as on a GPU, where each program loops over several blocks (blocks_per_prog > 1), with the
    inputs the ops give them: clipped_surrogate any dtype without ref/entropy, linear_ppo_loss float32 with both."""
    import torch

    from signalrl.kernels import ppo

    n = 5000
    w, m = torch.rand(n), (torch.rand(n) > 0.5).float()
    for dt in _FLOATS:
        lp, old, adv = (_t(n, dtype=dt) for _ in range(3))
        for dual in (None, 3.0):
            ppo.ppo_token_fwd(lp, old, adv, w, m, None, None, 0.2, 0.28, dual, "k3", 0.0, 0.0, _programs=2)
    for clip in (None, 0.2):
        ppo.value_loss_fwd(lp, old, adv, w, m, clip, _programs=2)
    lp, old, adv, ref, ent = (_t(n) for _ in range(5))
    for est in ppo.KL_CODES:
        ppo.ppo_token_fwd(lp, old, adv, w, m, ref, ent, 0.2, 0.28, None, est, 0.1, 0.01, _programs=2)
    ppo.ppo_token_fwd(lp, old, adv, w, m, ref, ent, 0.2, 0.28, 3.0, "k3", 0.1, 0.01, _programs=2)


def scenario_gae():
    """gae through the op layer (bool / float / no mask -> uint8 / float32 mask) and the forced-tile launcher."""
    import torch

    from signalrl import ops
    from signalrl.kernels import gae

    with ops.use_backend("triton"):
        for dt, B, T in (("float32", 1, 37), ("float32", 8, 300), ("bfloat16", 8, 300), ("float16", 8, 300)):
            r, v = _t(B, T, dtype=dt), _t(B, T, dtype=dt)
            mask = torch.rand(B, T) > 0.2
            ops.gae(r, v, mask, gamma=0.99, lam=0.95)
            if (dt, B) == ("float32", 8):
                ops.gae(r, v, mask.float(), gamma=1.0, lam=1.0, last_values=_t(B, dtype=dt))
                ops.gae(r, v, None)  # a float32 ones mask
    for (block_r, block_t), mdt in (((4, 256), torch.float32), ((1, 2048), torch.uint8)):  # forced tiles
        r, v = _t(16, 1000), _t(16, 1000)
        gae.gae_fwd(r, v, (torch.rand(16, 1000) > 0.5).to(mdt), torch.zeros(16), 0.99, 0.95,
                    _block_r=block_r, _block_t=block_t)


def scenario_logprobs():
    """token_logprobs fwd + bwd (out of place and in place), with and without entropy, LLM-sized and small vocab."""
    import torch

    from signalrl import ops

    with ops.use_backend("triton"):
        for dt in _FLOATS:
            for N, V in ((4, 128256), (3, 151)) if dt == "float32" else ((4, 128256),):
                t = torch.randint(0, V, (N,))
                t[0] = -100
                for ent in (False, True):
                    for inplace in (False, True):
                        x = _t(N, V, dtype=dt, grad=True)
                        out = ops.token_logprobs(x, t, return_entropy=ent, inplace_backward=inplace)
                        loss = (out[0].sum() + out[1].sum()) if ent else out.sum()
                        loss.backward()


def _linear_call(dt, N, H, V, has_bias, ent):
    import torch

    from signalrl import ops

    t = torch.randint(0, V, (N,))
    t[:3] = -100
    h, w = _t(N, H, dtype=dt, grad=True), _t(V, H, dtype=dt, grad=True)
    b = _t(V, dtype=dt, grad=True) if has_bias else None
    out = ops.linear_token_logprobs(h, w, t, bias=b, return_entropy=ent)
    ((out[0].sum() + out[1].sum()) if ent else out.sum()).backward()


def scenario_linear_logprobs():
    """linear_token_logprobs fwd + bwd: bias or not, entropy or not, bf16 (first, so the autotune configs compile
    with bf16 tiles) and float32 (ieee dot); an odd shape (no 16-divisibility). fp16 takes the bf16 code path."""
    from signalrl import ops

    with ops.use_backend("triton"):
        _linear_call("bfloat16", 64, 64, 1024, False, False)
        _linear_call("bfloat16", 64, 64, 1024, True, True)
        _linear_call("bfloat16", 37, 40, 333, True, False)
        _linear_call("float32", 64, 64, 1024, True, True)


def scenario_linear_frozen_head():
    """The row-major backward of a frozen LM head (weight without gradient): row chunks of 128 rows and a partial
    last one (a GPU's minimum chunk of 1024 rows lowered so a small problem takes this path), with and without bias,
    bf16 and float32, log-probs and linear_ppo_loss."""
    import torch

    from signalrl import ops
    from signalrl.kernels import linear_logprobs as LL
    from signalrl.kernels import linear_logprobs_bwd as LLB

    N, H, V = 200, 64, 1024
    saved = LLB._MIN_ROWS
    LLB._MIN_ROWS = 16
    try:
        assert LL.backward_plan(N, V, H, 2, False, True, False, False).row_major
        with ops.use_backend("triton"):
            for dt, has_bias in (("bfloat16", False), ("bfloat16", True), ("float32", False)):
                t = torch.randint(0, V, (N,))
                h, w = _t(N, H, dtype=dt, grad=True), _t(V, H, dtype=dt)
                b = _t(V, dtype=dt, grad=True) if has_bias else None
                lp, ent = ops.linear_token_logprobs(h, w, t, bias=b, return_entropy=True)
                (lp.sum() + ent.sum()).backward()
            old, adv, mask = _t(N), _t(N), torch.rand(N) > 0.2
            h, w = _t(N, H, dtype="bfloat16", grad=True), _t(V, H, dtype="bfloat16")
            loss = ops.linear_ppo_loss(h, w, t, old, adv, mask, entropy_coef=0.01)
            (loss[0] if isinstance(loss, tuple) else loss).backward()
    finally:
        LLB._MIN_ROWS = saved


def scenario_linear_ppo():
    """linear_ppo_loss fwd + bwd: every KL estimator with a reference, none, dual clip, entropy bonus, bias."""
    import torch

    from signalrl import ops

    H, V = 64, 512
    t = torch.randint(0, V, (2, 24))
    old, adv, mask = _t(2, 24), _t(2, 24), torch.rand(2, 24) > 0.2
    calls = [dict(ref_logprobs=_t(2, 24), kl_coef=0.1, kl_estimator=est) for est in ("k1", "k2", "k3", "abs")]
    calls += [dict(dual_clip=3.0, entropy_coef=0.01, bias=True, log_ratio_clamp=20.0),
              dict(dual_clip=3.0, ref_logprobs=_t(2, 24), kl_coef=0.1, bias=True), dict()]
    with ops.use_backend("triton"):
        for dt in ("bfloat16", "float32"):
            for kw in calls if dt == "bfloat16" else calls[-2:-1]:
                kw = dict(kw)
                h, w = _t(2, 24, H, dtype=dt, grad=True), _t(V, H, dtype=dt, grad=True)
                b = _t(V, dtype=dt, grad=True) if kw.pop("bias", False) else None
                loss = ops.linear_ppo_loss(h, w, t, old, adv, mask, bias=b, **kw)
                (loss[0] if isinstance(loss, tuple) else loss).backward()


SCENARIOS = [f"{HERE}:{n}" for n in sorted(globals()) if n.startswith("scenario_")]


# ------------------------------------------------------------------------------ hand cases (moved, kept as is)
# These were tests/kernels/test_triton_logprobs.py's offline compile: LLM-sized rows (BLOCK_V 8192, 16 warps) and
# the tile kernels with the sizes divisible by 16; the dot loops must be software-pipelined (cp.async).

_ALIGNED = {"N", "V", "H", "K", "K2", "M", "stride_am", "vc", "stride_row", "stride_out"}


def _given(name, kernel, sig, const, warps, stages):
    div = tuple(k for k, v in sig.items() if v.startswith("*") or k in _ALIGNED)
    return Case(f"given/{name}", f"signalrl.kernels.{kernel}", sig, const, warps, stages, div)


def _given_cases():
    f32, out = "*fp32", []
    for dt in ("bf16", "fp32"):
        row = dict(logits_ptr="*" + dt, targets_ptr="*i64", lp_ptr=f32, ent_ptr=f32, lse_ptr="*fp64", V="i32",
                   stride_row="i64", inv_temp="fp32", ignore_index="i32")
        out.append(_given(f"logprobs_fwd/{dt}", "logprobs:_token_logprobs_fwd_kernel", row,
                          dict(WITH_ENTROPY=True, BLOCK_V=8192), 16, 1))
        bwd = dict(logits_ptr="*" + dt, out_ptr="*" + dt, targets_ptr="*i64", glp_ptr=f32, gent_ptr=f32,
                   lse_ptr="*fp64", ent_ptr=f32, V="i32", stride_row="i64", stride_out="i64", inv_temp="fp32",
                   ignore_index="i32")
        out.append(_given(f"logprobs_bwd/{dt}", "logprobs:_token_logprobs_bwd_kernel", bwd,
                          dict(WITH_ENTROPY=True, BLOCK_V=8192), 16, 1))
    dt = "*bf16"
    tile = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64)
    fwd = dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, tgt_ptr="*i64", m_ptr=f32, s_ptr=f32, t_ptr=f32, zt_ptr=f32, N="i32",
               V="i32", H="i32", n_bucket="i32", v_per_split="i32", n_split="i32", inv_temp="fp32",
               ignore_index="i32")
    out.append(_given("lse_partial/bf16", "linear_logprobs:_lse_partial_kernel", fwd,
                      dict(HAS_BIAS=True, WITH_ENTROPY=True, DOT_F32=False, GROUP_N=8, **tile), 8, 3))
    merge = dict(m_ptr=f32, s_ptr=f32, t_ptr=f32, zt_ptr=f32, tgt_ptr="*i64", lp_ptr=f32, ent_ptr=f32,
                 lse_ptr="*fp64", N="i32", V="i32", n_split="i32", ignore_index="i32")
    out.append(_given("merge", "linear_logprobs:_merge_kernel", merge, dict(WITH_ENTROPY=True, BLOCK=256), 4, 1))
    grad = dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, tgt_ptr="*i64", lse_ptr="*fp64", glp_ptr=f32, gent_ptr=f32, ent_ptr=f32,
                scale_ptr=f32, g_ptr=dt, dbias_ptr=f32, N="i32", V="i32", H="i32", n_bucket="i32", c0="i32",
                vc="i32", inv_temp="fp32", ignore_index="i32")
    out.append(_given("grad_chunk/bf16", "linear_logprobs_bwd:_grad_chunk_kernel", grad,
                      dict(HAS_BIAS=True, WITH_ENTROPY=True, HAS_SCALE=True, NEED_BIAS=True, DOT_F32=False,
                           GROUP_N=8, **tile), 8, 3))
    mm = dict(a_ptr=dt, b_ptr=dt, c_ptr=f32, M="i32", K2="i32", K="i32", stride_am="i32", m_bucket="i32")
    out.append(_given("acc_matmul/bf16", "linear_logprobs_bwd:_acc_matmul_kernel", mm,
                      dict(DOT_F32=False, GROUP_N=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3))
    return out


_PIPELINED = {"given/lse_partial/bf16", "given/grad_chunk/bf16", "given/acc_matmul/bf16"}


# ------------------------------------------------------------------------------------------- harness self-test
# A throwaway kernel that reads a plain (non-constexpr) global: the interpreter runs it, the compiler must refuse it.
# It goes through both paths of the harness (a given case and a captured launch); if either reports success, the
# harness is broken and every other result here is worthless.

_SELFTEST_SRC = '''
import triton
import triton.language as tl

SCALE = tl.constexpr(2.0)
PLAIN = 2.0


@triton.jit
def good_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * SCALE, mask=offs < n)


@triton.jit
def bad_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, x * PLAIN, mask=offs < n)


def launch():
    import torch

    x = torch.zeros(100)
    good_kernel[(1,)](x, 100, BLOCK=128)
    bad_kernel[(1,)](x, 100, BLOCK=128)
'''


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline_compile")
    src = d / "selftest_kernels.py"
    src.write_text(textwrap.dedent(_SELFTEST_SRC))
    sig = {"x_ptr": "*fp32", "n": "i32"}
    selftest = [
        Case("selftest/good", f"{src}:good_kernel", sig, {"BLOCK": 128}),
        Case("selftest/bad", f"{src}:bad_kernel", sig, {"BLOCK": 128}),
        Case("selftest/wrong-signature", f"{src}:good_kernel", {"x_ptr": "*fp32"}, {"BLOCK": 128}),
    ]
    rep = run_offline(_given_cases() + selftest, SCENARIOS + [f"{src}:launch"], timeout=900)
    secs = sum(r.seconds for r in rep.results.values())
    print(f"\noffline sm_90 compile: {len(rep.results)} cases, {secs:.1f} s compiling")
    return rep


def _selftest(name):
    return "selftest" in name or "good_kernel" in name or "bad_kernel" in name


def _real(report):
    return {n: r for n, r in report.results.items() if not _selftest(n)}


def _kernel(report, name):
    return report.cases[name].kernel.rsplit(":", 1)[1]


def test_harness_reports_a_plain_global_read_as_a_failure(report):
    res = report.results
    assert res["selftest/good"].ok, res["selftest/good"].error
    assert res["selftest/good"].cubin_bytes > 0 and res["selftest/good"].ptx_target.startswith("sm_90")
    bad = res["selftest/bad"]
    assert not bad.ok and "global" in bad.error.lower() and "PLAIN" in bad.error, bad.error
    assert not res["selftest/wrong-signature"].ok and "missing ['n']" in res["selftest/wrong-signature"].error
    # the launch-capture path: the same two kernels launched from a scenario
    captured = {report.cases[n].kernel.rsplit(":", 1)[1]: r for n, r in res.items()
                if report.origins.get(n, "").endswith("launch") and "selftest_kernels" in report.origins[n]}
    assert set(captured) == {"good_kernel", "bad_kernel"}, captured
    assert captured["good_kernel"].ok, captured["good_kernel"].error
    assert not captured["bad_kernel"].ok and "global" in captured["bad_kernel"].error.lower()


def test_scenarios_ran(report):
    assert not report.scenario_errors, "\n\n".join(f"{k}:\n{v}" for k, v in report.scenario_errors.items())


def test_every_launch_compiles_for_sm90(report):
    real = _real(report)
    assert len(real) > 50
    bad = {n: r.error.strip().splitlines()[0] if r.error.strip() else "?" for n, r in real.items() if not r.ok}
    assert not bad, "\n".join(f"{n} ({report.origins.get(n)}): {e}" for n, e in bad.items())
    assert all(r.cubin_bytes > 0 and r.ptx_target.startswith("sm_90") for r in real.values())


def test_every_kernel_of_the_triton_families_is_compiled(report):
    """Every module-level kernel (a ``*_kernel`` JITFunction) of the families is launched by some scenario."""
    import ast

    compiled = {report.cases[n].kernel for n, r in _real(report).items() if r.ok and report.origins[n] != "given"}
    expected = set()
    for mod in KERNEL_MODULES:
        path = HERE.parents[2] / "signalrl" / "kernels" / f"{mod}.py"
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                expected.add(f"signalrl.kernels.{mod}:{node.name}")
    assert len(expected) >= 13
    assert expected <= compiled, sorted(expected - compiled)
    assert {k for k in compiled if k.startswith("signalrl.")} <= expected, "a launched kernel outside the list"


def _combos(report, kernel, *keys):
    out = set()
    for n, c in report.cases.items():
        if c.kernel.endswith(":" + kernel) and report.origins[n] != "given" and report.results[n].ok:
            merged = {**c.signature, **c.constexprs}
            out.add(tuple(merged.get(k) for k in keys))
    return out


def test_constexpr_and_dtype_combinations_the_launchers_use(report):
    ppo = _combos(report, "_ppo_fwd_kernel", "HAS_DUAL", "HAS_REF", "KL_EST", "HAS_ENT", "lp_ptr")
    assert {c[2] for c in ppo if c[1]} == {0, 1, 2, 3}  # every KL estimator with a reference
    for dual in (False, True):
        assert any(c[0] == dual and c[1] and c[3] for c in ppo)  # linear_ppo_loss: ref and entropy
        assert any(c[0] == dual and not c[1] and c[3] for c in ppo)
        for dt in ("*fp32", "*bf16", "*fp16"):
            assert (dual, False, 2, False, dt) in ppo  # clipped_surrogate (k3 is its fixed estimator code)
    lr_clamp = _combos(report, "_ppo_fwd_kernel", "HAS_LR_CLAMP", "HAS_ENT")
    assert {(True, False), (True, True)} <= lr_clamp  # log_ratio_clamp: clipped_surrogate and linear_ppo_loss
    per_prog = _combos(report, "_ppo_fwd_kernel", "blocks_per_prog")
    assert (1,) in per_prog and ("i32",) in per_prog
    assert _combos(report, "_value_fwd_kernel", "HAS_CLIP") == {(False,), (True,)}
    assert {c[1] for c in _combos(report, "_value_fwd_kernel", "HAS_CLIP", "v_ptr")} == {"*fp32", "*bf16", "*fp16"}
    assert {(1,), ("i32",)} <= _combos(report, "_ppo_finish_kernel", "P")
    assert {(1,), ("i32",)} <= _combos(report, "_value_finish_kernel", "P")
    for k in ("_kl_fwd_kernel", "_kl_bwd_kernel"):
        kl = _combos(report, k, "KL_EST", "lp_ptr")
        assert {c[0] for c in kl} == {0, 1, 2, 3}
        assert {c[1] for c in kl} == {"*fp32", "*bf16", "*fp16"}
    gae = _combos(report, "_gae_fwd_kernel", "mask_ptr", "rew_ptr", "B")
    assert {c[0] for c in gae} == {"*u8", "*fp32"}
    assert {c[1] for c in gae} == {"*fp32", "*bf16", "*fp16"}
    assert 1 in {c[2] for c in gae}  # B == 1 is specialized
    lse = _combos(report, "_lse_partial_kernel", "HAS_BIAS", "WITH_ENTROPY", "DOT_F32")
    for i in range(3):
        assert {c[i] for c in lse} == {False, True}, i
    grad = _combos(report, "_grad_chunk_kernel", "HAS_BIAS", "WITH_ENTROPY", "HAS_SCALE", "NEED_BIAS", "DOT_F32")
    for i in range(5):
        assert {c[i] for c in grad} == {False, True}, i
    assert {(c[2], c[3]) for c in grad} == {(s, nb) for s in (False, True) for nb in (False, True)}
    assert {c[0] for c in _combos(report, "_acc_matmul_kernel", "DOT_F32")} == {False, True}
    for k in ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"):
        rows = _combos(report, k, "WITH_ENTROPY", "logits_ptr", "BLOCK_V")
        assert {c[0] for c in rows} == {False, True}
        assert {c[1] for c in rows} == {"*fp32", "*bf16", "*fp16"}
        assert max(c[2] for c in rows) >= 4096  # the LLM-vocabulary row launch


def test_every_autotune_config_is_compiled(report):
    """Every tile of every autotuner (configs that differ only in num_stages: the one with the most stages)."""
    from _offline_compile import deepest_configs

    assert report.autotune_configs, "no autotuner found"
    assert {k.rsplit(":", 1)[1] for k in report.autotune_configs if k.startswith("signalrl.")} >= {
        "_gae_fwd_kernel", "_lse_partial_kernel", "_grad_chunk_kernel", "_acc_matmul_kernel"}
    for kernel, configs in report.autotune_configs.items():
        if not kernel.startswith("signalrl."):
            continue
        done = [(c.constexprs, c.num_warps, c.num_stages)
                for n, c in report.cases.items() if c.kernel == kernel and report.results[n].ok]
        for cfg in deepest_configs(configs):
            meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
            hit = any(all(m.get(k) == v for k, v in meta.items()) and w == cfg["num_warps"] and s == cfg["num_stages"]
                      for m, w, s in done)
            assert hit, f"{kernel}: config {cfg} never compiled"


def test_dot_loops_are_software_pipelined(report):
    """bf16/fp16 tiles with num_stages > 1: the loads of the dot loop become cp.async copies (as on a GPU)."""
    checked = 0
    for n, c in report.cases.items():
        r = report.results[n]
        dot = c.kernel.rsplit(":", 1)[1] in ("_lse_partial_kernel", "_grad_chunk_kernel", "_acc_matmul_kernel")
        div = c.divisible if c.divisible is not None else [k for k, t in c.signature.items() if t.startswith("*")]
        aligned = all(k in div for k, t in c.signature.items() if t.startswith("*")) and all(
            k in div for k in ("H", "K", "K2", "stride_am") if k in c.signature)
        if n in _PIPELINED or (dot and aligned and not c.constexprs.get("DOT_F32") and (c.num_stages or 3) > 1):
            assert r.ok, r.error
            assert r.async_copies > 0, f"{n}: the dot loop is not software-pipelined"
            checked += 1
    assert checked >= len(_PIPELINED) + 6


def test_given_cases_compile(report):
    for n, r in report.results.items():
        if n.startswith("given/"):
            assert r.ok, f"{n}: {r.error}"


# Per-block shared memory a kernel may use (opt-in maximum): H100/H200 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
_SMEM_SM90 = 232448
_SMEM_SM80 = 166912


def test_every_kernel_fits_in_shared_memory_and_does_not_spill(report):
    """A launch whose shared memory exceeds the device's limit fails on the GPU ("out of resources"), and local
    memory means register spills; ptxas's figures for sm_90 are exact, so both are checked here, before any GPU.
    Every fixed (non-autotuned) launch must also fit an A100, the smallest GPU the kernels are tuned for."""
    rows, checked = [], 0
    for n, r in _real(report).items():
        assert r.ok, r.error
        assert r.shared >= 0 and r.registers > 0 and r.local_bytes >= 0, f"{n}: no resource usage read: {r}"
        checked += 1
        if r.shared > _SMEM_SM90:
            rows.append(f"{n}: {r.shared} B of shared memory > {_SMEM_SM90} (sm_90)")
        if report.origins.get(n, "").endswith(" launch") and r.shared > _SMEM_SM80:
            rows.append(f"{n}: {r.shared} B of shared memory > {_SMEM_SM80} (sm_80) in a fixed launch")
        if r.local_bytes:
            rows.append(f"{n}: {r.local_bytes} B of local memory per thread (register spills), {r.registers} registers")
    assert checked > 50
    assert not rows, "\n".join(rows)


def test_prune_estimates_bound_the_real_shared_memory(report):
    """The autotune prunes drop configs by an estimate of shared memory; a config the estimate keeps but that does
    not fit would fail at launch. The estimate must be at least what ptxas reports (for the pipelined tiles, where
    shared memory is the A and B stages)."""
    from signalrl.kernels import linear_logprobs as ll

    checked = 0
    for n, c in report.cases.items():
        r = report.results[n]
        kernel = c.kernel.rsplit(":", 1)[1]
        if not r.ok or c.constexprs.get("DOT_F32") or kernel not in (
                "_lse_partial_kernel", "_grad_chunk_kernel", "_acc_matmul_kernel"):
            continue
        elem = 4 if c.signature.get("x_ptr", c.signature.get("a_ptr")) == "*fp32" else 2
        kw, stages = c.constexprs, c.num_stages or 3
        est = (ll._mm_smem if kernel == "_acc_matmul_kernel" else ll._dot_smem)(kw, stages, elem)
        assert r.shared <= est, f"{n}: ptxas uses {r.shared} B of shared memory, the prune estimates {est}"
        checked += 1
    assert checked >= 6
