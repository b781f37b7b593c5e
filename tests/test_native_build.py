"""The native CPU extension (csrc/ + signalrl/native.py): build, registration, switches, and each
kernel function of docs/backends.md against signalrl.reference in float64.

Skipped with the reason when this machine cannot build it (no C++ compiler or ninja).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from signalrl import native
from signalrl import reference as ref

REPO = Path(__file__).resolve().parents[1]


def _why_unbuildable() -> str | None:
    if not native.enabled():
        return "SIGNAL_NATIVE=0"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    try:
        native.load()
    except RuntimeError as exc:
        return str(exc)
    return None


_SKIP = _why_unbuildable()
needs_native = pytest.mark.skipif(_SKIP is not None, reason=f"native extension unavailable: {_SKIP}")


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """‖got − truth‖ / ‖truth‖ in float64 (floored); NaN/inf in got → inf."""
    g, t = got.detach().double(), truth.detach().double()
    assert g.shape == t.shape, (g.shape, t.shape)
    if not torch.isfinite(g).all():
        return float("inf")
    return (g - t).norm().item() / max(t.norm().item(), 1e-6 * max(t.numel(), 1) ** 0.5)


def check(what, got, truth, dtype, baseline=None):
    """fp32 ≤ 1e-5 relative; bf16/fp16 ≤ 1e-2 and no worse than 2× the same-dtype PyTorch baseline
    (or than rounding to that dtype)."""
    err = rel_err(got, truth)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    if baseline is not None and dtype != torch.float32:
        bound = max(2 * rel_err(baseline, truth), 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11)
        assert err <= bound, f"{what}: relative error {err:.3e} > same-dtype PyTorch bound {bound:.3e}"


# ---- build, registration, switches ------------------------------------------------------------

# the kernel ops csrc/cpu/*.cpp implement for CPU (TORCH_LIBRARY_IMPL(signalrl, CPU))
NATIVE_KERNELS = (
    "token_logprobs_fwd", "token_logprobs_bwd", "linear_token_logprobs_fwd", "linear_token_logprobs_bwd", "gae_fwd",
    "ppo_token_fwd", "value_loss_fwd", "kl_penalty_fwd", "kl_penalty_bwd", "linear_ppo_fwd", "linear_ppo_bwd",
    "linear_token_logprobs_frozen_fwd", "linear_token_logprobs_frozen_bwd", "linear_ppo_frozen_fwd",
    "linear_token_logprobs_kept_fwd", "linear_token_logprobs_kept_bwd", "linear_ppo_kept_fwd",
)


@needs_native
def test_builds_and_registers_every_kernel():
    path = native.load()
    assert Path(path).exists()
    assert native.available() and native.why() is None
    from signalrl.ops._library import KERNELS

    for name in NATIVE_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"signalrl::{name}", "CPU"), name
        assert KERNELS[name].implemented_by("native"), name
    assert not KERNELS["token_logprobs_bwd_inplace"].implemented_by("native")  # Triton only
    assert not KERNELS["linear_token_logprobs_frozen_fwd"].has_triton  # native only: Triton keeps the trained-head plan


def test_build_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SIGNAL_NATIVE_BUILD_DIR", str(tmp_path / "b"))
    assert native.build_dir() == tmp_path / "b"
    monkeypatch.delenv("SIGNAL_NATIVE_BUILD_DIR")
    assert "signalrl" in str(native.build_dir()) and torch.__version__.split("+")[0] in str(native.build_dir())


def test_signal_native_0_disables(monkeypatch):
    monkeypatch.setenv("SIGNAL_NATIVE", "0")
    assert not native.available()
    from signalrl.ops._library import KERNELS

    assert not KERNELS["gae_fwd"].implemented_by("native")
    assert "SIGNAL_NATIVE=0" in native.why()
    with pytest.raises(RuntimeError, match="SIGNAL_NATIVE=0"):
        native.load()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def test_import_compiles_nothing(tmp_path):
    out = _run(
        """
        import time; t = time.perf_counter()
        import signalrl.native as n
        print(time.perf_counter() - t)
        """,
        SIGNAL_NATIVE_BUILD_DIR=str(tmp_path / "b"),
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "b").exists(), "importing signalrl.native created the build directory"


def test_checkout_reads_csrc_of_the_repo():
    assert native._CSRC == REPO / "csrc"
    assert all(p.is_file() and REPO / "csrc" in p.parents for p in native.sources())


@needs_native
def test_installed_wheel_ships_the_sources_and_builds_from_them(tmp_path):
    """A non-editable install has no checkout beside it: the wheel carries csrc/ as signalrl/_csrc/, and
    signalrl.native builds (or, with identical sources, reuses the cached build) from there."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("signal_rl-*.whl")
    inst = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    repo_sources = sorted(p.relative_to(REPO / "csrc") for p in native._all_source_files())
    shipped = site / "signalrl" / "_csrc"
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file()) == repo_sources
    for rel in repo_sources:
        assert (shipped / rel).read_bytes() == (REPO / "csrc" / rel).read_bytes(), rel
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import torch, signalrl, signalrl.native as n
            from signalrl import ops
            n.load()
            x, t = torch.randn(3, 7, dtype=torch.float64).float(), torch.tensor([0, 6, 3])
            with ops.use_backend("native"):
                lp = ops.token_logprobs(x, t)
            torch.testing.assert_close(lp, torch.log_softmax(x, -1).gather(1, t[:, None])[:, 0])
            print(signalrl.__file__); print(n._CSRC); print(n.available())
            """)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    mod_file, csrc, ok = out.stdout.strip().splitlines()[-3:]
    assert Path(mod_file).is_relative_to(site) and Path(csrc) == shipped and ok == "True", out.stdout


def test_prebuilt_library_vs_source_times(tmp_path, monkeypatch):
    """A checkout's prebuilt library older than its sources is stale; a wheel's is not (an installer gives the
    library and the shipped sources arbitrary times)."""
    pkg = tmp_path / "signalrl"
    (pkg / "_csrc").mkdir(parents=True)
    lib = pkg / "_native.cpython-311-x86_64-linux-gnu.so"
    lib.write_bytes(b"")
    src = pkg / "_csrc" / "kl.cpp"
    src.write_text("// newer than the library")
    os.utime(lib, (1_000, 1_000))
    monkeypatch.setattr(native, "_PACKAGE_DIR", pkg)
    monkeypatch.setattr(native, "_SHIPPED_CSRC", pkg / "_csrc")
    monkeypatch.setattr(native, "_CSRC", pkg / "_csrc")
    assert native._prebuilt() == lib  # shipped sources: trusted
    checkout = tmp_path / "csrc"
    checkout.mkdir()
    (checkout / "kl.cpp").write_text("// edited after the build")
    monkeypatch.setattr(native, "_CSRC", checkout)
    assert native._prebuilt() is None  # a checkout: rebuilt from the newer sources
    os.utime(lib, None)
    os.utime(checkout / "kl.cpp", (2_000, 2_000))
    assert native._prebuilt() == lib


def test_no_compiler_warns_once_and_falls_back(tmp_path):
    out = _run(
        """
        import warnings
        import signalrl.native as n
        n._prebuilt = lambda: None  # ignore an ahead-of-time build in the source tree
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a, b = n.available(), n.available()
            import signalrl.ops
            g = signalrl.ops._library.KERNELS["gae_fwd"].implemented_by("native")
        print(a, b, g, len([x for x in w if "native" in str(x.message)]))
        print(n.why())
        """,
        SIGNAL_NATIVE_BUILD_DIR=str(tmp_path / "b"), CXX="/nonexistent/c++",
    )
    assert out.returncode == 0, out.stderr
    first, reason = out.stdout.strip().splitlines()[-2:]
    assert first == "False False False 1", out.stdout
    assert "compiler" in reason


@needs_native
def test_meta_and_fake_tensors():
    ops = torch.ops.signalrl
    x = torch.empty(5, 11, device="meta", dtype=torch.bfloat16)
    t = torch.empty(5, device="meta", dtype=torch.long)
    lp, ent, lse = ops.token_logprobs_fwd(x, t, 1.0, -100, True)
    assert lp.shape == ent.shape == lse.shape == (5,) and lp.dtype == torch.float32 and lse.dtype == torch.float64
    assert ops.token_logprobs_fwd(x, t, 1.0, -100, False)[1].shape == (0,)
    g = ops.token_logprobs_bwd(lp, ent, x, t, lse, ent, 1.0, -100)
    assert g.shape == x.shape and g.dtype == x.dtype
    h = torch.empty(5, 3, device="meta")
    w = torch.empty(11, 3, device="meta", dtype=torch.bfloat16)
    gh, gw, gb = ops.linear_token_logprobs_bwd(lp, ent, h, w, None, t, lse, ent, 1.0, -100, True, True, True)
    assert gh.shape == h.shape and gw.shape == w.shape and gw.dtype == w.dtype and gb.numel() == 0
    r = torch.empty(4, 9, device="meta")
    a, ret = ops.gae_fwd(r, r, r, torch.empty(4, device="meta"), 0.9, 0.8)
    assert a.shape == ret.shape == r.shape
    v = torch.empty(5, device="meta")
    loss, g, ge, stats = ops.ppo_token_fwd(v, v, v, v, v, None, v, 0.2, 0.2, 3.0, "k3", 0.1, 0.01, None)
    assert loss.shape == () and g.shape == ge.shape == (5,) and stats.shape == (9,)
    assert ops.ppo_token_fwd(v, v, v, v, v, v, None, 0.2, 0.2, None, "k1", 0.1, 0.0, None)[2].shape == (0,)
    loss, g, stats = ops.value_loss_fwd(v, v, v, v, v, 0.2)
    assert loss.shape == () and g.shape == (5,) and stats.shape == (4,)
    assert ops.kl_penalty_fwd(v, v, "k3").shape == ops.kl_penalty_bwd(v, v, v, "abs").shape == (5,)
    out = ops.linear_ppo_fwd(h, w, None, t, v, v, v, v, None, 1.0, -100, 0.2, 0.28, None, "k3", 0.0, 0.01, None)
    assert [tuple(o.shape) for o in out] == [(), (9,), (5,), (5,), (5,), (5,), (5,)]
    assert [o.dtype for o in out].count(torch.float64) == 1 and out[4].dtype == torch.float64  # lse
    assert ops.linear_ppo_fwd(h, w, None, t, v, v, v, v, v, 1.0, -100, 0.2, 0.2, 2.0, "k2", 0.1, 0.0, None)[6].numel() == 0
    gh, gw, gb = ops.linear_ppo_bwd(torch.empty((), device="meta"), lp, ent, h, w, None, t, lse, ent, 1.0, -100,
                                    True, True, False)
    assert gh.shape == h.shape and gw.shape == w.shape and gb.numel() == 0


@needs_native
def test_ppo_epilogue_is_deterministic_across_thread_counts():
    """Statistics are partial sums over fixed chunks merged in order: the thread count changes no bit."""
    n = 3 * 4096 + 17
    lp, old = torch.randn(n) - 2, torch.randn(n) - 2
    adv, w, m, ref, ent = torch.randn(n), torch.rand(n) / n, (torch.rand(n) > 0.3).float(), torch.randn(n), torch.rand(n)
    threads = torch.get_num_threads()
    outs = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            outs.append(torch.ops.signalrl.ppo_token_fwd(lp, old, adv, w, m, ref, ent, 0.2, 0.28, 3.0, "k3", 0.05, 0.01, None))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def _split_calls():
    """(name, call) pairs large enough that parallel_work cuts them into tiles for several threads (csrc/cpu/
    parallel.h: ≥ kMinSplitNs of work)."""
    g = torch.Generator().manual_seed(7)
    n = 160 * 4096 + 17  # ppo / value: 161 chunks
    lp, old = torch.randn(n, generator=g) - 2, torch.randn(n, generator=g) - 2
    adv, ref, ent = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.rand(n, generator=g)
    m = (torch.rand(n, generator=g) > 0.3).float()
    r, v = torch.randn(512, 1031, generator=g), torch.randn(512, 1031, generator=g)
    gm = (torch.rand(512, 1031, generator=g) > 0.1).float()
    logits = torch.randn(77, 32000, generator=g) * 3
    targets = torch.randint(0, 32000, (77,), generator=g)
    ops = torch.ops.signalrl
    empty = torch.empty(0)
    return [
        ("ppo_token_fwd", lambda: ops.ppo_token_fwd(lp, old, adv, empty, m, ref, ent, 0.2, 0.28, 3.0, "k3", 0.05,
                                                    0.01, None)),
        ("value_loss_fwd", lambda: ops.value_loss_fwd(lp, old, adv, empty, m, 0.2)),
        ("gae_fwd", lambda: ops.gae_fwd(r, v, gm, torch.zeros(512), 0.99, 0.95)),
        ("token_logprobs_fwd", lambda: ops.token_logprobs_fwd(logits, targets, 1.0, -100, True)),
        ("kl_penalty_fwd", lambda: ops.kl_penalty_fwd(lp.repeat(2), ref.repeat(2), "k3")),
    ]


@needs_native
@pytest.mark.parametrize("name", [name for name, _ in _split_calls()])
def test_results_do_not_depend_on_how_the_work_is_split(name):
    """Calls big enough to be cut into tiles for the pool's helpers give the same bits on 1, 2 or 3 threads."""
    call = dict(_split_calls())[name]
    threads = torch.get_num_threads()
    outs = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            out = call()
            outs.append(out if isinstance(out, (tuple, list)) else (out,))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b), name


@needs_native
def test_torch_compile_fullgraph_traces_native_ops():
    def f(r, v, m, last):
        a, ret = torch.ops.signalrl.gae_fwd(r, v, m, last, 0.99, 0.95)
        return a * 2 + ret

    r, v = torch.randn(3, 7), torch.randn(3, 7)
    m = (torch.rand(3, 7) > 0.3).float()
    last = torch.randn(3)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(r, v, m, last), f(r, v, m, last))


# ---- family logprobs --------------------------------------------------------------------------


def _logits(n, v, dtype, scale=3.0):
    return (torch.randn(n, v) * scale).to(dtype)


def _targets(n, v, ignore_index=-100, ignored=()):
    t = torch.randint(0, v, (n,))
    for i in ignored:
        t[i] = ignore_index
    return t


def _ref_logprobs_grads(x, t, g_lp, g_ent, temperature, ignore_index, dtype):
    """float64 truth of values and d/dlogits, plus the same-dtype PyTorch reference."""
    out = {}
    for key, inp in (("truth", x.double()), ("baseline", x.to(dtype))):
        inp = inp.detach().requires_grad_()
        lp, ent = ref.token_logprobs(inp, t, temperature=temperature, ignore_index=ignore_index, return_entropy=True)
        loss = (lp.double() * g_lp.double()).sum()
        if g_ent is not None:
            loss = loss + (ent.double() * g_ent.double()).sum()
        loss.backward()
        out[key] = (lp.detach(), ent.detach(), inp.grad)
    return out


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", [(1, 1), (7, 1000), (13, 2049), (3, 4097)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_reference(dtype, n, v, temperature):
    fwd, bwd = torch.ops.signalrl.token_logprobs_fwd, torch.ops.signalrl.token_logprobs_bwd
    x = _logits(n, v, dtype)
    t = _targets(n, v, ignored=[n // 2] if n > 1 else [])
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    r = _ref_logprobs_grads(x, t, g_lp, g_ent, temperature, -100, dtype)
    lp, ent, lse = fwd(x, t, temperature, -100, True)
    assert lp.dtype == ent.dtype == torch.float32 and lse.dtype == torch.float64
    check("logprobs", lp, r["truth"][0], dtype)
    check("entropy", ent, r["truth"][1], dtype)
    grad = bwd(g_lp, g_ent, x, t, lse, ent, temperature, -100)
    assert grad.dtype == dtype and grad.shape == x.shape
    check("grad_logits", grad, r["truth"][2], dtype, baseline=r["baseline"][2])
    # without entropy: outputs match, gradient drops the entropy term
    lp2, ent2, lse2 = fwd(x, t, temperature, -100, False)
    assert ent2.numel() == 0
    torch.testing.assert_close(lp2, lp, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
    r2 = _ref_logprobs_grads(x, t, g_lp, None, temperature, -100, dtype)
    check("grad_logits (no entropy)", bwd(g_lp, None, x, t, lse2, None, temperature, -100), r2["truth"][2], dtype,
          baseline=r2["baseline"][2])


@needs_native
def test_token_logprobs_ignored_rows_and_custom_ignore_index():
    fwd, bwd = torch.ops.signalrl.token_logprobs_fwd, torch.ops.signalrl.token_logprobs_bwd
    x = _logits(6, 301, torch.float32)
    t = torch.full((6,), 7)
    lp, ent, lse = fwd(x, t, 1.0, 7, True)  # every row ignored (ignore_index = 7)
    assert (lp == 0).all() and (ent == 0).all()
    g = bwd(torch.randn(6), torch.randn(6), x, t, lse, ent, 1.0, 7)
    assert (g == 0).all()
    t = _targets(6, 301, ignore_index=-1, ignored=[0, 5])
    lp, ent, lse = fwd(x, t, 1.0, -1, True)
    assert lp[0] == 0 and lp[5] == 0 and ent[0] == 0 and (lp[1:5] < 0).all()
    g = bwd(torch.ones(6), torch.ones(6), x, t, lse, ent, 1.0, -1)
    assert (g[0] == 0).all() and (g[5] == 0).all() and (g[1:5] != 0).any()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_huge_logits(dtype):
    fwd, bwd = torch.ops.signalrl.token_logprobs_fwd, torch.ops.signalrl.token_logprobs_bwd
    n, v = 5, 3001
    x = torch.randn(n, v)
    x[:, ::7] = 1e4
    x[:, 3::11] = -1e4
    x[1] = 1e4  # a flat row of huge logits: uniform distribution
    x = x.to(dtype)
    t = _targets(n, v)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    r = _ref_logprobs_grads(x, t, g_lp, g_ent, 1.0, -100, dtype)
    lp, ent, lse = fwd(x, t, 1.0, -100, True)
    check("logprobs", lp, r["truth"][0], dtype)
    check("entropy", ent, r["truth"][1], dtype)
    grad = bwd(g_lp, g_ent, x, t, lse, ent, 1.0, -100)
    # lse is float64 in the contract, so near |lse| = 1e4 no float32 rounding of it reaches log p: plain tolerance
    check("grad_logits", grad, r["truth"][2], dtype, baseline=r["baseline"][2])


@needs_native
def test_token_logprobs_inf_and_nan():
    fwd = torch.ops.signalrl.token_logprobs_fwd
    x = torch.randn(3, 5000)
    x[0, 100:4000] = float("-inf")  # masked vocabulary: finite result, entropy over the rest
    x[1, 4321] = float("nan")
    t = torch.tensor([5, 6, 7])
    lp, ent, _ = fwd(x, t, 1.0, -100, True)
    rlp, rent = ref.token_logprobs(x.double(), t, return_entropy=True)
    torch.testing.assert_close(lp[0].double(), rlp[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[0].double(), rent[0], rtol=1e-5, atol=1e-5)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]), "a NaN logit must not give a finite result"
    assert torch.isfinite(lp[2])


@needs_native
def test_token_logprobs_target_out_of_range_is_nan_never_read():
    """The kernel contract (docs/backends.md, "Bad inputs"): NaN log-prob, entropy as usual, no log-prob gradient;
    the public op refuses such targets on CPU before any kernel runs."""
    x = torch.randn(3, 10)
    t = torch.tensor([1, 10, -2])
    lp, ent, lse = torch.ops.signalrl.token_logprobs_fwd(x, t, 1.0, -100, True)
    rlp, rent = ref.token_logprobs(x.double(), t, return_entropy=True)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1:]).all()
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-6)
    g = torch.ops.signalrl.token_logprobs_bwd(torch.ones(3), torch.zeros(3), x, t, lse, ent, 1.0, -100)
    assert (g[1:] == 0).all() and (g[0] != 0).any()


# ---- family linear_logprobs -------------------------------------------------------------------


def _ref_linear(h, w, b, t, g_lp, g_ent, temperature, ignore_index, dtype):
    out = {}
    for key, cast in (("truth", torch.double), ("baseline", dtype)):
        hh, ww = h.to(cast).detach().requires_grad_(), w.to(cast).detach().requires_grad_()
        bb = None if b is None else b.to(cast).detach().requires_grad_()
        lp, ent = ref.linear_token_logprobs(hh, ww, t, bias=bb, temperature=temperature, ignore_index=ignore_index,
                                            return_entropy=True)
        loss = (lp.double() * g_lp.double()).sum()
        if g_ent is not None:
            loss = loss + (ent.double() * g_ent.double()).sum()
        loss.backward()
        out[key] = (lp.detach(), ent.detach(), hh.grad, ww.grad, None if bb is None else bb.grad)
    return out


def _linear_kernels(keep):
    """(forward, backward) of the recompute plan (keep None) or of the kept-logits plan keeping ``keep(v)`` columns,
    with the recompute plan's signatures."""
    if keep is None:
        return torch.ops.signalrl.linear_token_logprobs_fwd, torch.ops.signalrl.linear_token_logprobs_bwd
    kept = {}

    def fwd(hidden, weight, *args):
        lp, ent, lse, kept["logits"] = torch.ops.signalrl.linear_token_logprobs_kept_fwd(
            hidden, weight, *args, keep(weight.shape[0]))
        return lp, ent, lse

    def bwd(g_lp, g_ent, *args):
        return torch.ops.signalrl.linear_token_logprobs_kept_bwd(g_lp, g_ent, kept["logits"], *args)

    return fwd, bwd


# the kept-logits plan: no column, the first 64 (a straddled group block), about half, all of them
KEEPS = {"recompute": None, "keep0": lambda v: 0, "keep64": lambda v: min(v, 64), "keep-half": lambda v: v // 2,
         "keep-all": lambda v: v}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", [(1, 1, 1), (9, 17, 1500), (1030, 5, 1031), (9, 17, 5000), (1030, 5, 3000),
                                   (40, 3300, 2100)])  # the last three read kept blocks in each backward plan
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("keep", KEEPS.values(), ids=KEEPS.keys())
def test_linear_token_logprobs_matches_reference(dtype, n, h, v, with_bias, keep):
    fwd, bwd = _linear_kernels(keep)
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5 * 2).to(dtype)
    bias = torch.randn(v).to(dtype) if with_bias else None
    t = _targets(n, v, ignored=[0, n - 1] if n > 2 else [])
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    temperature = 0.8
    r = _ref_linear(hidden, weight, bias, t, g_lp, g_ent, temperature, -100, dtype)
    lp, ent, lse = fwd(hidden, weight, bias, t, temperature, -100, True)
    check("logprobs", lp, r["truth"][0], dtype)
    check("entropy", ent, r["truth"][1], dtype)
    gh, gw, gb = bwd(g_lp, g_ent, hidden, weight, bias, t, lse, ent, temperature, -100, True, True, True)
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    check("grad_hidden", gh, r["truth"][2], dtype, baseline=r["baseline"][2])
    check("grad_weight", gw, r["truth"][3], dtype, baseline=r["baseline"][3])
    if with_bias:
        assert gb.dtype == bias.dtype
        check("grad_bias", gb, r["truth"][4], dtype, baseline=r["baseline"][4])
    else:
        assert gb.numel() == 0
    # only some gradients asked for; no entropy term
    r2 = _ref_linear(hidden, weight, bias, t, g_lp, None, temperature, -100, dtype)
    gh2, gw2, gb2 = bwd(g_lp, None, hidden, weight, bias, t, lse, None, temperature, -100, False, True, False)
    assert gh2.numel() == 0 and gb2.numel() == 0
    check("grad_weight (no entropy)", gw2, r2["truth"][3], dtype, baseline=r2["baseline"][3])


@needs_native
def test_linear_token_logprobs_all_ignored_and_huge():
    fwd, bwd = torch.ops.signalrl.linear_token_logprobs_fwd, torch.ops.signalrl.linear_token_logprobs_bwd
    hidden, weight, bias = torch.randn(4, 6), torch.randn(50, 6), torch.randn(50)
    t = torch.full((4,), -100)
    lp, ent, lse = fwd(hidden, weight, bias, t, 1.0, -100, True)
    assert (lp == 0).all() and (ent == 0).all()
    gh, gw, gb = bwd(torch.ones(4), torch.ones(4), hidden, weight, bias, t, lse, ent, 1.0, -100, True, True, True)
    assert (gh == 0).all() and (gw == 0).all() and (gb == 0).all()
    _check_huge_logits(fwd, bwd)  # this run's draw
    torch.manual_seed(437)  # a draw whose float32 logits are ill-conditioned (float32 PyTorch's gradients: 1.7e-4)
    _check_huge_logits(fwd, bwd)


def _check_huge_logits(fwd, bwd):
    """Logits of order ±1e4. The lse is float64 (docs/backends.md), so the gradients are held to the plain float32
    tolerance, unless the draw itself is ill-conditioned in float32: two logits of a row within a few units of each
    other, where the float32 GEMM's rounding of ±1e4 logits (~1e-3) moves p by ~1e-3 whatever computes it. Over 3000
    seeds, float32 PyTorch's own gradients missed 1e-5 in 27, by up to 20x; the kernel is then held to no worse than
    twice that same-dtype error."""
    hidden = torch.randn(5, 8) * 100
    weight = torch.randn(300, 8) * 10
    t = _targets(5, 300)
    g = torch.randn(5)
    r = _ref_linear(hidden, weight, None, t, g, g, 1.0, -100, torch.float32)
    lp, ent, lse = fwd(hidden, weight, None, t, 1.0, -100, True)
    check("logprobs (huge)", lp, r["truth"][0], torch.float32)
    gh, gw, _ = bwd(g, g, hidden, weight, None, t, lse, ent, 1.0, -100, True, True, False)
    for what, got, i in (("grad_hidden (huge)", gh, 2), ("grad_weight (huge)", gw, 3)):
        err, base = rel_err(got, r["truth"][i]), rel_err(r["baseline"][i], r["truth"][i])
        assert err <= max(1e-5, 2 * base), f"{what}: relative error {err:.3e} > max(1e-5, 2 x float32 PyTorch's {base:.3e})"


# ---- family gae ---------------------------------------------------------------------------------


def _masks(b, t):
    yield "all", torch.ones(b, t)
    yield "random", (torch.rand(b, t) > 0.4).float()
    lengths = torch.randint(0, t + 1, (b,))
    right = (torch.arange(t)[None, :] < lengths[:, None]).float()
    yield "right-padding", right
    yield "left-padding", right.flip(1)
    spans = torch.ones(b, t)
    for i in range(b):  # masked spans inside the sequence (tool output in a multi-turn rollout)
        s = int(torch.randint(0, t, ()))
        spans[i, s:s + int(torch.randint(1, max(2, t // 3), ()))] = 0
    yield "spans", spans
    yield "none", torch.zeros(b, t)


@needs_native
@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (13, 57), (19, 130)])
@pytest.mark.parametrize("last", [False, True])
def test_gae_matches_reference(b, t, last):
    gae = torch.ops.signalrl.gae_fwd
    for name, mask in _masks(b, t):
        rewards, values = torch.randn(b, t), torch.randn(b, t)
        lv = torch.randn(b) if last else torch.zeros(b)
        gamma, lam = 0.97, 0.9
        adv, ret = gae(rewards, values, mask, lv, gamma, lam)
        radv, rret = ref.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam,
                             last_values=lv.double() if last else None)
        # A = r + γ·V' − V can cancel to ~0 (a 1×1 case does, now and then): measure the error against the
        # scale of the terms, which is what float32 rounding is proportional to.
        scale = (rewards.abs() + values.abs()).double().norm().item() + lv.double().norm().item()
        for what, got, truth in (("advantages", adv, radv), ("returns", ret, rret)):
            err = (got.double() - truth).norm().item() / max(truth.norm().item(), scale)
            assert torch.isfinite(got).all() and err <= 1e-5, f"{what} ({name}): relative error {err:.3e}"
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all(), name


@needs_native
def test_gae_masked_nan_does_not_leak():
    rewards, values = torch.randn(2, 9), torch.randn(2, 9)
    mask = torch.ones(2, 9)
    mask[:, 4] = 0
    rewards[:, 4] = float("nan")
    values[:, 4] = float("nan")
    adv, ret = torch.ops.signalrl.gae_fwd(rewards, values, mask, torch.zeros(2), 0.99, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    radv, _ = ref.gae(rewards.double(), values.double(), mask)
    check("advantages", adv, radv, torch.float32)
