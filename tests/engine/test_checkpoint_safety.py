"""Checkpoint safety: all-or-nothing loads, names that stay inside the run, no pickle, exports that never delete
what they did not write, and a `latest` that survives a kill at any point of a save."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from signalrl.engine import checkpoint
from signalrl.engine.config import RunConfig
from signalrl.engine.models import load_base_model
from signalrl.engine.frozen_models import ReferenceCache
from signalrl.engine.run import Run
from signalrl.ops import use_backend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=1,
              total_steps=10, seed=3)
BATCH = [{"prompt": "2+2=", "response": "4"}, {"prompt": "hello ", "response": "world"}]


def _step(run):
    loss = run.forward_backward(BATCH, "causal_lm").loss
    run.optim_step()
    return loss


# ------------------------------------------------------------------------------------------- the run's state
def _bits(t):
    t = t.detach().cpu().reshape(-1).contiguous()
    return t.view(torch.uint8).clone() if t.numel() else t.clone()


def _snapshot(run):
    """Everything a load could change, as bytes."""
    opt = run.optimizer.state_dict()
    return {
        "params": {n: _bits(p) for n, p in run.trainable_parameters()},
        "dtypes": {n: p.dtype for n, p in run.trainable_parameters()},
        "grads": {n: None if p.grad is None else _bits(p.grad) for n, p in run.trainable_parameters()},
        "opt_state": {k: {kk: _bits(v) if isinstance(v, torch.Tensor) else v for kk, v in st.items()}
                      for k, st in opt["state"].items()},
        "opt_groups": opt["param_groups"],
        "sched": run.scheduler.state_dict(), "lr_lambdas": len(run.scheduler.lr_lambdas),
        "rng": (_bits(torch.random.get_rng_state()), random.getstate(), repr(np.random.get_state()),
                _bits(run.sampling_generator.get_state()),
                _bits(run._rng_state) if getattr(run, "_rng_state", None) is not None else None),
        "step": run.step, "heads": list(run.heads), "pending": run.pending_grads,
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key in ("params", "grads"):
            assert a[key].keys() == b[key].keys(), key
            for n in a[key]:
                x, y = a[key][n], b[key][n]
                assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"{key} {n} changed"
        elif key == "opt_state":
            assert a[key].keys() == b[key].keys()
            for pid in a[key]:
                for k, v in a[key][pid].items():
                    w = b[key][pid][k]
                    assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f"optimizer {pid}.{k}"
        elif key == "rng":
            for x, y in zip(a[key], b[key]):
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, "an RNG state changed"
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def saved(make_run, tmp_path_factory):
    """Run A (value head, 2 steps) saved as 'good'; run B (same base, no head yet, 1 step + pending gradients)."""
    a = make_run(value_head=True, **CONFIG)
    _step(a)
    _step(a)
    good = a.save_state("good").path
    b = make_run(**CONFIG)
    _step(b)
    b.forward_backward(BATCH, "causal_lm")  # accumulated, un-stepped gradients
    return a, b, good


def _rewrite_json(fname, change):
    def corrupt(d):
        p = os.path.join(d, fname)
        with open(p) as f:
            obj = json.load(f)
        obj = change(obj)
        with open(p, "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return corrupt


def _rewrite_tensors(fname, change):
    def corrupt(d):
        p = os.path.join(d, fname)
        tensors = load_file(p)
        change(tensors)
        save_file(tensors, p)
    return corrupt


def _raw(fname, data):
    def corrupt(d):
        with open(os.path.join(d, fname), "wb") as f:
            f.write(data)
    return corrupt


def _truncate(fname):
    def corrupt(d):
        p = os.path.join(d, fname)
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.truncate(size - 7)
    return corrupt


def _first(tensors, prefix=""):
    return min(k for k in tensors if k.startswith(prefix))


def _set(tensors, key, value):
    tensors[key] = value


def _pop(d, key):
    d = dict(d)
    d.pop(key)
    return d


def _with(d, **kw):
    return {**d, **kw}


CORRUPTIONS = {
    # file named in the error: the corruption
    "rng_empty": ("rng.json", _rewrite_json("rng.json", lambda o: {})),
    "rng_python": ("rng.json", _rewrite_json("rng.json", lambda o: _with(o, python=[3, [1, 2, 3], None]))),
    "rng_numpy": ("rng.json", _rewrite_json("rng.json", lambda o: _with(o, numpy=["MT19937", [-1] * 624, 0, 0, 0.0]))),
    "rng_torch_short": ("rng.safetensors", _rewrite_tensors("rng.safetensors", lambda t: _set(
        t, "torch", t["torch"][:100].clone()))),
    "rng_no_sampling": ("rng.safetensors", _rewrite_tensors("rng.safetensors", lambda t: t.pop("sampling"))),
    "scheduler_string": ("scheduler.json", _raw("scheduler.json", b'"a string"')),
    "scheduler_base_lrs": ("scheduler.json", _rewrite_json("scheduler.json", lambda o: _with(o, base_lrs=[0.1]))),
    "scheduler_epoch": ("scheduler.json", _rewrite_json("scheduler.json", lambda o: _with(o, last_epoch="x"))),
    "scheduler_missing_key": ("scheduler.json", _rewrite_json("scheduler.json", lambda o: _pop(o, "base_lrs"))),
    "step_abc": ("state.json", _rewrite_json("state.json", lambda o: _with(o, step="abc"))),
    "step_negative": ("state.json", _rewrite_json("state.json", lambda o: _with(o, step=-1))),
    "step_bool": ("state.json", _rewrite_json("state.json", lambda o: _with(o, step=True))),
    "state_not_json": ("state.json", _raw("state.json", b"{not json")),
    "state_list": ("state.json", _raw("state.json", b"[]")),
    "heads_bogus": ("state.json", _rewrite_json("state.json", lambda o: _with(o, heads=["value", "bogus"]))),
    "fingerprint_missing": ("state.json", _rewrite_json("state.json", lambda o: _pop(o, "frozen_fingerprint"))),
    "format_99": ("state.json", _rewrite_json("state.json", lambda o: _with(o, format_version=99))),
    "optimizer_no_groups": ("optimizer.json", _rewrite_json("optimizer.json", lambda o: {"state": o["state"]})),
    "optimizer_group_count": ("optimizer.json", _rewrite_json("optimizer.json", lambda o: _with(
        o, param_groups=o["param_groups"][:1]))),
    "optimizer_params_short": ("optimizer.json", _rewrite_json("optimizer.json", lambda o: _with(
        o, param_groups=[_with(o["param_groups"][0], params=o["param_groups"][0]["params"][:-1]),
                         *o["param_groups"][1:]]))),
    "optimizer_no_betas": ("optimizer.json", _rewrite_json("optimizer.json", lambda o: _with(
        o, param_groups=[_pop(g, "betas") for g in o["param_groups"]]))),
    "optimizer_lr_string": ("optimizer.json", _rewrite_json("optimizer.json", lambda o: _with(
        o, param_groups=[_with(g, lr="fast") for g in o["param_groups"]]))),
    "optimizer_state_key": ("optimizer.json", _rewrite_json("optimizer.json", lambda o: _with(
        o, state={"9999": next(iter(o["state"].values()))}))),
    "optimizer_not_json": ("optimizer.json", _raw("optimizer.json", b"\x80\x04garbage")),
    "optimizer_tensor_shape": ("optimizer.safetensors", _rewrite_tensors("optimizer.safetensors", lambda t: _set(
        t, _first(t, "state.0.exp_avg"), torch.zeros(2, 2)))),
    "optimizer_tensor_nan": ("optimizer.safetensors", _rewrite_tensors("optimizer.safetensors", lambda t: _set(
        t, _first(t, "state.0.exp_avg"), torch.full_like(t[_first(t, "state.0.exp_avg")], float("nan"))))),
    "optimizer_tensor_missing": ("optimizer.safetensors", _rewrite_tensors("optimizer.safetensors", lambda t: t.pop(
        _first(t, "state.0.exp_avg_sq")))),
    "optimizer_garbage": ("optimizer.safetensors", _raw("optimizer.safetensors", b"\x00" * 64)),
    "weights_truncated": ("weights.safetensors", _truncate("weights.safetensors")),
    "weights_nan": ("weights.safetensors", _rewrite_tensors("weights.safetensors", lambda t: t[_first(t)].view(-1)
                                                            .__setitem__(0, float("nan")))),
    "weights_inf": ("weights.safetensors", _rewrite_tensors("weights.safetensors", lambda t: t["heads.value.linear.bias"]
                                                            .fill_(float("inf")))),
    "weights_dtype": ("weights.safetensors", _rewrite_tensors("weights.safetensors", lambda t: _set(
        t, _first(t), t[_first(t)].double()))),
    "weights_shape": ("weights.safetensors", _rewrite_tensors("weights.safetensors", lambda t: _set(
        t, _first(t), t[_first(t)][:1].clone()))),
    "weights_missing": ("weights.safetensors", _rewrite_tensors("weights.safetensors", lambda t: t.pop(_first(t)))),
    "file_missing": ("incomplete", lambda d: os.remove(os.path.join(d, "rng.json"))),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_leaves_the_run_unchanged(saved, tmp_path, case):
    _, b, good = saved
    fname, corrupt = CORRUPTIONS[case]
    bad = tmp_path / "bad"
    shutil.copytree(os.path.realpath(good), bad)
    corrupt(str(bad))
    before = _snapshot(b)
    with pytest.raises(ValueError) as err:
        b.load_state(str(bad))
    msg = str(err.value)
    assert fname in msg and str(bad) in msg, msg
    if case == "weights_nan":
        assert "NaN" in msg and min(load_file(os.path.join(os.path.realpath(good), "weights.safetensors"))) in msg
    _assert_same(before, _snapshot(b))  # weights, grads, optimizer, scheduler, every RNG, step, heads: bit for bit
    assert b.heads == {} and len(b.optimizer.param_groups) == 1


def test_good_checkpoint_loads_after_failures(saved):
    a, b, good = saved
    res = b.load_state(good)
    assert res.step == 2 and list(b.heads) == ["value"] and b.pending_grads == 0
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.trainable_parameters(), b.trainable_parameters()))


def test_nan_weights_are_refused(make_run, tmp_path):
    run = make_run(**CONFIG)
    _step(run)
    ck = run.save_state("ck").path
    p = os.path.join(os.path.realpath(ck), "weights.safetensors")
    tensors = load_file(p)
    name = max(tensors)
    tensors[name][..., -1] = float("inf")
    save_file(tensors, p)
    with pytest.raises(ValueError, match=rf"weights\.safetensors has non-finite values .*{name}"):
        run.load_state("ck")
    assert run.step == 1


def test_name_is_never_read_from_the_current_directory(make_run, tmp_path, monkeypatch):
    run = make_run(**CONFIG)
    _step(run)
    run.save_state("shadow")  # this run's own 'shadow': step 1
    _step(run)
    shutil.copytree(os.path.realpath(run.save_state("other").path), tmp_path / "shadow")  # ./shadow: step 2
    monkeypatch.chdir(tmp_path)
    assert run.load_state("shadow").step == 1  # the name: the run's checkpoint, not ./shadow
    assert run.load_state("./shadow").step == 2  # an explicit path
    fresh = make_run(**CONFIG)
    with pytest.raises(ValueError, match="no checkpoint 'shadow'"):
        fresh.load_state("shadow")  # ./shadow exists, but this run has no checkpoint of that name
    assert fresh.step == 0


@pytest.mark.parametrize("bad, exc, match", [
    ("a" * 250, ValueError, "at most 200 bytes"),
    ("é" * 101, ValueError, "at most 200 bytes"),
    ("a\0b", ValueError, "NUL"),
    ("", ValueError, "non-empty"),
    (".hidden", ValueError, "cannot start with '.'"),
    ("..", ValueError, "cannot start with '.'"),
    ("a/b", ValueError, "'/'"),
    (None, TypeError, "name"),
    (7, TypeError, "name"),
])
def test_bad_names_are_refused_clearly(saved, bad, exc, match):
    a, _, _ = saved
    with pytest.raises(exc, match=match):
        a.save_state(bad)
    if bad is not None and not (isinstance(bad, str) and "/" in bad):
        with pytest.raises(exc, match=match):
            a.load_state(bad)


def test_load_none_and_nul_path(saved):
    a, _, _ = saved
    with pytest.raises(TypeError, match="name_or_path: expected a checkpoint name or a path"):
        a.load_state(None)
    with pytest.raises(ValueError, match="NUL"):
        a.load_state("./x\0y")


def test_longest_name_saves_and_loads(saved):
    a, _, _ = saved
    name = "n" * checkpoint.MAX_NAME_BYTES
    assert a.save_state(name).name == name and a.load_state(name).step == a.step


# ------------------------------------------------------------------------------------------- no pickle
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def test_pickle_payload_never_runs(saved, tmp_path):
    _, b, good = saved
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"state": _Payload(str(marker)), "param_groups": []})
    # A format-1 checkpoint: pickled optimizer.pt / scheduler.pt / rng.pt.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(os.path.realpath(good), "weights.safetensors"), old)
    (old / "state.json").write_text(json.dumps({"format_version": 1, "step": 2, "heads": []}))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (old / name).write_bytes(payload)
    # A format-2 directory with a stray .pt, and pickles where JSON/safetensors belong.
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.realpath(good), mixed)
    (mixed / "optimizer.pt").write_bytes(payload)
    disguised = tmp_path / "disguised"
    shutil.copytree(os.path.realpath(good), disguised)
    for name in ("optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors", "scheduler.json"):
        (disguised / name).write_bytes(payload)
    before = _snapshot(b)
    for d, match in ((old, "format_version 1"), (mixed, "format_version 1"), (disguised, "optimizer")):
        with pytest.raises(ValueError, match=match):
            b.load_state(str(d))
        assert not marker.exists()
    _assert_same(before, _snapshot(b))


def test_no_unsafe_deserialization_in_the_package():
    hits = []
    for dirpath, _, files in os.walk(os.path.join(REPO, "signalrl")):
        for f in files:
            if not f.endswith(".py"):
                continue
            with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if ("torch.load(" in line and "weights_only=True" not in line) or "import pickle" in line \
                            or "pickle.load" in line:
                        hits.append(f"{f}:{i}: {line.strip()}")
    assert hits == []


# ------------------------------------------------------------------------------------------- export
def test_export_never_deletes_what_it_did_not_write(saved, tmp_path):
    a, _, _ = saved
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty"):
        a.export_model(str(user))
    with pytest.raises(ValueError, match="not a Signal export"):
        a.export_model(str(user), overwrite=True)
    assert sorted(os.listdir(user)) == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        a.export_model(str(f), overwrite=True)
    assert f.read_text() == "x"

    out = tmp_path / "export"
    assert a.export_model(str(out)) == str(out)
    assert "signal_export.json" in os.listdir(out) and "config.json" in os.listdir(out)
    with pytest.raises(ValueError, match="overwrite=True"):
        a.export_model(str(out))
    a.export_model(str(out), overwrite=True)  # a previous export holding only its own files: replaced
    (out / "extra.txt").write_text("added later")
    with pytest.raises(ValueError, match="extra.txt"):
        a.export_model(str(out), overwrite=True)
    assert (out / "extra.txt").read_text() == "added later"
    empty = tmp_path / "empty"
    empty.mkdir()
    a.export_model(str(empty))
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []  # no temporary directory left


# ------------------------------------------------------------------------------------------- kills
CHILD = textwrap.dedent(r"""
    import json, os, random, shutil, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from signalrl.engine import Engine, checkpoint

    root, config, batch = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    eng = Engine(os.path.join(root, "engine"))
    rid = eng.create_run(**config).result()["run_id"]

    def step():
        loss = eng.request(rid, "forward_backward", batch, "causal_lm").result().loss
        eng.request(rid, "optim_step").result()
        return loss

    step()
    eng.request(rid, "save_state", "latest").result()  # the previous checkpoint: step 1
    losses = [step()]  # what follows step 1; the run is now at step 2, the state the save under test writes
    run = eng._run(rid)
    eng.close()  # no worker thread left: the forks below have one thread
    ck = os.path.join(run.run_dir, "checkpoints")
    baseline = os.path.join(root, "baseline")
    shutil.copytree(ck, baseline, symlinks=True)
    POINTS = [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "symlink"), (os, "mkdir"), (os, "unlink"),
              (shutil, "rmtree"), (checkpoint, "save_file")]

    def wait(pid, limit=60.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SystemExit("a forked save hung")

    def save_dying_at(k, log=None):
        pid = os.fork()
        if pid == 0:
            try:
                calls = []
                for mod, name in POINTS:
                    def wrapper(*a, _real=getattr(mod, name), _name=name, **kw):
                        calls.append(_name)
                        if len(calls) == k:
                            os._exit(3)  # killed just before this call: no cleanup, no flush
                        return _real(*a, **kw)
                    setattr(mod, name, wrapper)
                run.save_state("latest")
                if log:
                    with open(log, "w") as f:
                        json.dump(calls, f)
                os._exit(0)
            except BaseException:
                os._exit(99)
        return wait(pid)

    def restore():
        shutil.rmtree(ck)
        shutil.copytree(baseline, ck, symlinks=True)

    def snap(tag):
        shutil.copytree(ck, os.path.join(root, "snaps", tag, "checkpoints"), symlinks=True)
        restore()

    assert save_dying_at(10**9, os.path.join(root, "points.json")) == 0
    points = json.load(open(os.path.join(root, "points.json")))
    restore()
    codes = {}
    for k in range(1, len(points) + 2):
        codes[k] = save_dying_at(k)
        snap(f"k{k:03d}")
    for i in range(3):  # real SIGKILLs at random moments of back-to-back saves
        pid = os.fork()
        if pid == 0:
            while True:
                run.save_state("latest")
        time.sleep(random.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        snap(f"sigkill{i}")
    losses.append(run.forward_backward(batch, "causal_lm").loss)  # the uninterrupted run's step 3
    print(json.dumps({"points": points, "codes": codes, "losses": losses}))
""")


def test_latest_survives_a_kill_at_every_point_of_a_save(tmp_path):
    # CUDA hidden: the child forks mid-run, and CUDA cannot run in a forked process (what is tested is the files)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SIGNAL_BACKEND": "reference",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), json.dumps(CONFIG), json.dumps(BATCH)],
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail("the training subprocess timed out")
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    points, losses = report["points"], report["losses"]
    assert {"save_file", "fsync", "symlink", "replace", "rmtree"} <= set(points)
    flip = points.index("replace") + 1  # dying at or before call number `flip` keeps the previous checkpoint
    assert report["codes"] == {str(k): 3 if k <= len(points) else 0 for k in range(1, len(points) + 2)}

    snaps = sorted(os.listdir(tmp_path / "snaps"))
    cache = ReferenceCache(lambda name, **kw: load_base_model(name, **kw)[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tag in snaps:
            run_dir = tmp_path / "snaps" / tag
            run = Run(f"reopen-{tag}", RunConfig(**CONFIG), run_dir=str(run_dir), reference_cache=cache, device="cpu")
            try:
                entries = sorted(os.listdir(run_dir / "checkpoints"))
                latest = run_dir / "checkpoints" / "latest"
                assert entries == sorted(["latest", os.readlink(latest)]), (tag, entries)  # no leftovers
                step = run.load_state("latest").step
                if tag.startswith("k"):
                    assert step == (1 if int(tag[1:]) <= flip else 2), (tag, step)
                else:
                    assert step in (1, 2)
                with use_backend("reference"):
                    loss = run.forward_backward(BATCH, "causal_lm").loss
                assert loss == losses[step - 1], (tag, step)  # bit-identical to the uninterrupted run
            finally:
                run.close()
    finally:
        torch.set_num_threads(threads)
