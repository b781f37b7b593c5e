"""The benchmark suite: the --quick preset end to end (CI smoke) and the pieces it relies on."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from signalrl.bench import providers as P
from signalrl.bench import report, timing
from signalrl.bench.runner import ROW_FIELDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("token_logprobs", "token_logprobs+entropy", "linear_token_logprobs", "linear_token_logprobs+entropy",
       "clipped_surrogate", "kl_penalty", "value_loss", "gae", "linear_ppo_loss")
STATUS_PREFIXES = ("ok", "not installed", "unavailable: ", "skipped: ", "error: ", "oom", "n/a: ")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        # the preset's own 45 s budget is a CPU figure: on a GPU machine Triton's first compiles alone can spend it
        [sys.executable, "-m", "benchmarks", "--quick", "--budget-s", "200", "--out", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    return out, rows, proc


def test_quick_writes_every_output(quick_run):
    out, rows, _ = quick_run
    for name in ("rows.jsonl", "rows.csv", "results.md", "meta.json"):
        assert (out / name).stat().st_size > 0, name
    pngs = list((out / "plots").glob("*.png"))
    assert pngs, "no plots"
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    with open(out / "rows.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert tuple(csv_rows[0].keys()) == ROW_FIELDS
    md = (out / "results.md").read_text()
    assert "| op | shape | dtype | mode | reference ms" in md
    meta = json.loads((out / "meta.json").read_text())
    assert meta["preset"] == "quick" and meta["ceilings"]["copy_gbps"] > 0
    assert meta["ceilings"]["matmul_tflops_fp32"] > 0


def test_quick_rows_schema(quick_run):
    _, rows, _ = quick_run
    assert rows
    for r in rows:
        assert set(r) == set(ROW_FIELDS), set(r) ^ set(ROW_FIELDS)
        assert r["status"].startswith(STATUS_PREFIXES), r["status"]
        assert r["mode"] in ("fwd", "bwd", "full")
        for k in ("device", "torch", "python", "date", "op", "provider", "dtype"):
            assert r[k], (k, r)
        if r["status"] == "ok":
            assert 0 < r["time_ms_p20"] <= r["time_ms"] <= r["time_ms_p80"], r
            assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
            assert r["samples"] >= 1
            assert r["check"] == "reference" or r["check"] == "pass" or r["check"].startswith("n/a"), r
            if r["gbps"] is not None or r["tflops"] is not None:
                assert r["pct_of_ceiling"] > 0 and r["ceiling"]


def test_quick_covers_every_op_provider_and_mode(quick_run):
    _, rows, _ = quick_run
    ok = [r for r in rows if r["status"] == "ok"]
    for op in OPS:
        assert {r["mode"] for r in ok if r["op"] == op and r["provider"] == "reference"} >= (
            {"fwd"} if op == "gae" else {"fwd", "bwd", "full"}), op
    losses = {r["op"] for r in ok if r["op"].startswith("loss:")}
    if importlib.util.find_spec("signalrl.losses") is not None:
        assert len(losses) >= 7, losses
    providers = {r["provider"] for r in rows}
    assert providers >= {"reference", "compile", "native", "triton", "liger", "cce", "verl_loop"}
    # the verl-style loop and the reference agree (same mask semantics)
    assert any(r["provider"] == "verl_loop" and r["check"] == "pass" for r in ok)
    # ratios: every measured non-reference row of an op with a measured reference has one
    for r in ok:
        if r["provider"] != "reference" and any(
                o["provider"] == "reference" and (o["op"], o["mode"], o["shape"]) == (r["op"], r["mode"], r["shape"])
                for o in ok):
            assert r["speedup_vs_reference"] and r["speedup_vs_reference"] > 0


def test_missing_peers_are_reported_never_faked(quick_run):
    _, rows, _ = quick_run
    for prov, pkg in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
        statuses = {r["status"] for r in rows if r["provider"] == prov}
        assert statuses
        if importlib.util.find_spec(pkg) is None:
            assert statuses == {"not installed"}, statuses
        elif not torch.cuda.is_available():
            assert all(s.startswith("unavailable") for s in statuses), statuses


def test_percentiles_and_summary():
    assert timing.percentile([1, 2, 3, 4, 5], 50) == 3
    assert timing.percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    t = timing.summarize([0.001, 0.002, 0.003, 0.004, 0.010])
    assert t.median_ms == pytest.approx(3.0) and t.p20_ms < t.median_ms < t.p80_ms and t.samples == 5


def test_rotation_copies():
    mib = 2**20
    assert timing.rotation_copies(1 * mib, 32 * mib) == 8          # small inputs: capped at 8 copies
    assert timing.rotation_copies(16 * mib, 32 * mib) == 4         # 4 × 16 MiB ≥ 2 × 32 MiB
    assert timing.rotation_copies(512 * mib, 32 * mib) == 1        # larger than the cache: one copy
    assert timing.rotation_copies(600 * mib, 2**40) == 1           # bounded by total memory


def test_cpu_peak_memory_sees_temporaries():
    x = torch.randn(256, 1024)

    def temp():  # a 1024×1024 float32 temporary (4 MiB) that is freed before returning
        y = x.t() @ x
        return float(y[0, 0])

    peak = timing.peak_memory(temp, torch.device("cpu"))
    assert 4 * 2**20 <= peak < 6 * 2**20
    assert timing.peak_memory(lambda: x[0, 0].item(), torch.device("cpu")) < 2**16


def test_ratios_and_markdown_from_rows(tmp_path):
    base = dict.fromkeys(ROW_FIELDS)
    rows = []
    for prov, ms in (("reference", 10.0), ("native", 2.0), ("liger", 4.0)):
        r = dict(base, op="gae", provider=prov, mode="fwd", shape="B=2,T=8", dtype="fp32", time_ms=ms,
                 time_ms_p20=ms * 0.9, time_ms_p80=ms * 1.1, peak_mem_bytes=2**20, status="ok",
                 params={"B": 2, "T": 8}, check="pass", device="cpu")
        rows.append(r)
    rows.append(dict(base, op="gae", provider="cce", mode="fwd", shape="B=2,T=8", dtype="fp32",
                     status="not installed", params={"B": 2, "T": 8}))
    meta = report.finalize(str(tmp_path), rows, {"device": "cpu", "ceilings": {}, "versions": {}})
    native = next(r for r in rows if r["provider"] == "native")
    assert native["speedup_vs_reference"] == pytest.approx(5.0)
    assert native["ratios"]["liger"] == pytest.approx(2.0)
    md = (tmp_path / "results.md").read_text()
    assert "| gae | B=2,T=8 | fp32 | fwd |" in md and "5×" in md and "**cce**: not installed" in md
    assert meta["plots"] == []  # one point per provider: nothing to plot against


def test_require_missing_package():
    with pytest.raises(P.NotInstalled):
        P.require("signal_no_such_package_xyz")


def test_ctrl_c_keeps_measured_rows(tmp_path, monkeypatch):
    from signalrl.bench import cli
    from signalrl.bench.runner import Runner

    real = Runner.run_case
    calls = []

    def run_then_interrupt(self, case):
        if calls:
            raise KeyboardInterrupt
        calls.append(case)
        return real(self, case)

    monkeypatch.setattr(Runner, "run_case", run_then_interrupt)
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["--quick", "--ops", "kl_penalty,gae", "--providers", "reference", "--out", str(tmp_path),
                       "--no-progress", "--no-plots"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 130
    rows = report.load_rows(str(tmp_path / "rows.jsonl"))
    assert rows and all(r["op"] == "kl_penalty" for r in rows)
    assert any(r["status"] == "ok" for r in rows)
    assert json.loads((tmp_path / "meta.json").read_text())["interrupted"] is True
    assert "interrupted" in (tmp_path / "results.md").read_text()


@pytest.mark.gpu
def test_quick_on_cuda(tmp_path):
    """The CUDA path (events, L2 flush, max_memory_allocated, the triton provider) on tiny shapes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cuda", "--ops", "token_logprobs,gae,kl_penalty",
         "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = report.load_rows(str(tmp_path / "rows.jsonl"))
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"reference", "triton"}
    for r in ok:
        assert 0 < r["time_ms_p20"] <= r["time_ms"] <= r["time_ms_p80"] and r["peak_mem_bytes"] >= 0
        assert "interpreter" not in (r["note"] or "")
        assert r["check"] in ("reference", "pass"), r
    assert all(r["device"] and "cpu" not in r["device"].lower() for r in rows)


def test_api_overhead_quick(tmp_path):
    """The training-API overhead benchmark runs end to end; its two loops compute the same losses."""
    from benchmarks import api_overhead

    out = tmp_path / "api.md"
    assert api_overhead.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "**API overhead: " in text and "the losses of the two agree to" in text
    assert "| 20 ms |" in text  # the pipelining table, with client-side preparation


def test_gpu_check_dry_run_collects_every_test_kernel_tests_first(tmp_path):
    """gpu_check.sh on a CPU (--dry-run): every test module imports and collects, GPU-only ones included, in the
    order the GPU run uses (tests/gpu, kernels, ops, losses, then the rest)."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--skip-bench"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in (tmp_path / "pytest.log").read_text().splitlines() if "::" in line]
    plain = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu or not gpu", "--collect-only", "-q",
                            "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, TRITON_INTERPRET="1"))  # as the dry run collects (backends differ)
    assert sorted(ids) == sorted(line for line in plain.stdout.splitlines() if "::" in line)
    dirs = [i.split("/")[1] for i in ids]
    first = [d for i, d in enumerate(dirs) if i == 0 or dirs[i - 1] != d]
    assert first[:4] == ["gpu", "kernels", "ops", "losses"], first
    assert "tests:" in proc.stdout and "(exit 0)" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: gpu_check.sh runs these benchmarks "
                    "on it")
def test_gpu_kernel_benchmarks_dry_run(tmp_path):
    """benchmarks/gpu_logprobs.py (which also runs the GAE / PPO cases of gpu_ppo_gae.py) on a CPU with the Triton
    interpreter and tiny shapes: every case runs without an error row, so a GPU lease is never spent finding out
    that a benchmark script is broken. Rows include the frozen-head (row-major) linear backward."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_logprobs", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (js,) = list(tmp_path.glob("gpu_logprobs-dryrun-*.json"))
    rows = json.loads(js.read_text())["rows"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    cases = {r["case"] for r in rows}
    for want in ("linear_token_logprobs fwd+bwd", "linear_token_logprobs fwd+bwd, frozen head",
                 "torch unfused logprobs fwd+bwd"):
        assert want in cases, sorted(cases)
    assert any(c.startswith("breakdown:") for c in cases) and any("gae" in c.lower() for c in cases), sorted(cases)


def test_paired_case_times_its_providers_in_turns():
    """A paired case (a whole loss on a model) times its providers in rotating turns, round after round, within
    each mode, each call inside its own provider's context (its forced backend): the timed calls switch provider
    once or twice a round (A B | B A | A B ...), each mode's rows come out provider by provider, a provider whose
    first call fails gets its error rows, and one that fails while being timed gets an error row for that mode
    while the other is still measured."""
    import contextlib

    from signalrl.bench.cases import Case, Preset
    from signalrl.bench.runner import Runner

    calls, active, timing_mode = [], [], {}

    def factory(name, fail_first=False, fail_in_full=False):
        @contextlib.contextmanager
        def ctx():
            active.append(name)
            try:
                yield
            finally:
                active.pop()

        def make_impl(device, x):
            def fn(a):
                if fail_first:
                    raise RuntimeError("boom")
                assert active == [name], active  # every call runs inside this provider's ctx alone
                if fail_in_full and timing_mode.get("mode") == "full":
                    raise RuntimeError("fails in full")
                calls.append(name)
                time.sleep(0.002)
                return a * 2.0
            return P.Impl(fn, ctx=ctx)
        return make_impl

    case = Case(op="toy", family="toy", params={"N": 4}, dtype=torch.float32,
                make=lambda device, gen: {"a": torch.ones(4, requires_grad=True)},
                impls={"reference": factory("reference"), "native": factory("native"),
                       "triton": factory("triton", fail_first=True)},
                modes=("fwd", "full"), bytes_model=False, paired=True)
    rows = []
    runner = Runner(Preset(name="cpu", device=torch.device("cpu")), {}, {},
                    providers=["reference", "native", "triton"], modes=["fwd", "full"], budget_s=None,
                    emit=rows.append)
    runner.run_case(case)
    assert [(r["provider"], r["mode"], r["status"][:5]) for r in rows] == [
        ("reference", "fwd", "ok"), ("reference", "full", "ok"), ("native", "fwd", "ok"), ("native", "full", "ok"),
        ("triton", "fwd", "error"), ("triton", "full", "error")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["samples"] >= 5 and r["time_ms"] >= 2.0 for r in ok)
    switches = sum(a != b for a, b in zip(calls, calls[1:]))
    rounds = sum(r["samples"] for r in ok) // 2  # both providers sample once a round
    assert switches >= rounds - 2, (switches, rounds)  # at least one switch a round

    # native fails while being timed in "full": its own error row; the reference is still measured
    case.impls = {"reference": factory("reference"), "native": factory("native", fail_in_full=True)}
    real = runner._measure_interleaved

    def measure(case_, preps, inputs, mode, out):
        timing_mode["mode"] = mode  # tells fn which mode is being timed
        return real(case_, preps, inputs, mode, out)

    runner._measure_interleaved = measure
    rows.clear()
    runner.run_case(case)
    assert [(r["provider"], r["mode"], r["status"][:5]) for r in rows] == [
        ("reference", "fwd", "ok"), ("reference", "full", "ok"), ("native", "fwd", "ok"), ("native", "full", "error")]
    assert "fails in full" in rows[-1]["status"]


def test_paired_case_interrupted_keeps_the_rows_it_measured():
    """Ctrl-C (or --max-s) in the middle of a paired case: the modes measured before it keep their rows."""
    from signalrl.bench.cases import Case, Preset
    from signalrl.bench.runner import Runner

    state = {"full": False}

    def factory(device, x):
        def fn(a):
            if state["full"] and torch.is_grad_enabled() and len(calls) > 3:
                raise KeyboardInterrupt
            calls.append(1)
            return a * 2.0
        return P.Impl(fn)

    calls = []
    case = Case(op="toy", family="toy", params={"N": 4}, dtype=torch.float32,
                make=lambda device, gen: {"a": torch.ones(4, requires_grad=True)},
                impls={"reference": factory, "native": factory}, modes=("fwd", "full"), bytes_model=False,
                paired=True)
    rows = []
    runner = Runner(Preset(name="quick", device=torch.device("cpu")), {}, {}, providers=["reference", "native"],
                    modes=["fwd", "full"], budget_s=None, emit=rows.append)
    real = runner._measure_interleaved

    def measure(case, preps, inputs, mode, out):
        if mode == "full":
            state["full"] = True
            calls.clear()
        return real(case, preps, inputs, mode, out)

    runner._measure_interleaved = measure
    with pytest.raises(KeyboardInterrupt):
        runner.run_case(case)
    assert [(r["provider"], r["mode"], r["status"]) for r in rows] == [("reference", "fwd", "ok"),
                                                                       ("native", "fwd", "ok")]


def test_time_interleaved_rotates_the_order_of_each_round():
    from signalrl.bench import timing

    calls = []
    steps = {k: (lambda k=k: calls.append(k) or time.sleep(0.011)) for k in "abc"}
    out = timing.time_interleaved(steps, torch.device("cpu"), warmup_s=0.0, warmup_min=1, rep_s=0.0,
                                  min_samples=3, max_samples=3)
    assert calls[3:] == list("abc" "bca" "cab")  # after one warm-up call each
    assert set(out) == set("abc") and all(t.samples == 3 and t.median_ms >= 11.0 for t in out.values())


def test_time_interleaved_leaves_out_a_step_that_raises():
    from signalrl.bench import timing

    calls = []

    def bad():
        if len(calls) > 4:
            raise RuntimeError("late failure")
        calls.append("bad")

    steps = {"ok": lambda: calls.append("ok") or time.sleep(0.011), "bad": bad}
    out = timing.time_interleaved(steps, torch.device("cpu"), warmup_s=0.0, warmup_min=1, rep_s=0.0, min_samples=6,
                                  max_samples=6)
    assert isinstance(out["bad"], RuntimeError) and out["ok"].samples == 6
    with pytest.raises(KeyboardInterrupt):
        timing.time_interleaved({"x": lambda: (_ for _ in ()).throw(KeyboardInterrupt())}, torch.device("cpu"))
