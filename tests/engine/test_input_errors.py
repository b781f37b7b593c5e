"""Every bad input of issue 11's list gets a ValueError/TypeError naming the argument, before any compute, and
leaves the run exactly as it was. Each case here failed (or was silently accepted) before."""
import concurrent.futures
import math
import threading
import time

import pytest
import torch

from signalrl.engine import Engine, RunNotFoundError
from signalrl.engine.limits import RequestTooLargeError
from signalrl.engine.worker import DeviceWorker

from _run_state import assert_same, snapshot

SFT = [{"prompt": "2+2=", "response": "4"}, {"prompt": "hello ", "response": "world"}]
V = 260  # the byte tokenizer's vocabulary (signal-tiny)


def seqs(ids, mask=None):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else torch.tensor(mask)}


@pytest.fixture(scope="module")
def run(make_run):
    r = make_run(lora_r=4, learning_rate=1e-2, reward_head=True)
    r.forward_backward(SFT, "causal_lm")
    r.optim_step()
    r.forward_backward(SFT, "causal_lm")  # accumulated gradients exist
    return r


def ppo_example(**over):
    ex = {"prompt": "ab", "response": "cd", "old_log_probs": [-1.0, -1.0, -1.0], "rewards": 1.0}
    return [dict(ex, **over)]


FORWARD_BACKWARD = [
    ("token id >= vocab", seqs([[1, V, 3]]), "causal_lm", r"input_ids.*\[0, 260\).*got 260"),
    ("negative token id", seqs([[1, -5, 3]]), "causal_lm", r"input_ids.*got -5"),
    ("label out of range", {**seqs([[1, 2, 3]]), "labels": torch.tensor([[-100, 11_000, 3]])}, "causal_lm",
     r"labels.*-100"),
    ("T = 0", {"input_ids": torch.zeros(1, 0, dtype=torch.long), "attention_mask": torch.zeros(1, 0, dtype=torch.long)},
     "causal_lm", r"input_ids.*non-empty"),
    ("B = 0", {"input_ids": torch.zeros(0, 3, dtype=torch.long), "attention_mask": torch.zeros(0, 3, dtype=torch.long)},
     "causal_lm", r"input_ids.*non-empty"),
    ("mask value 2", seqs([[1, 2, 3]], [[1, 2, 1]]), "causal_lm", r"attention_mask.*\{0, 1\}.*got 2"),
    ("mask value -1", seqs([[1, 2, 3]], [[1, -1, 1]]), "causal_lm", r"attention_mask.*got -1"),
    ("longer than the positions", seqs([[1] * 600]), "causal_lm", r"input_ids.*at most 512.*got 600"),
    ("old_log_probs = +5", ppo_example(old_log_probs=[5.0] * 3), "enhanced_ppo", r"old_log_probs.*<= 0.*5\.0"),
    ("old_log_probs = 1e30", ppo_example(old_log_probs=[1e30] * 3), "enhanced_ppo", r"old_log_probs"),
    ("old_log_probs NaN where counted", ppo_example(old_log_probs=[math.nan] * 3), "enhanced_ppo",
     r"old_log_probs.*finite"),
    ("DPO without rejected", [{"prompt": "a", "chosen": "b"}], "dpo", r"rejected"),
    ("GRPO without responses", [{"prompt": "a", "responses": [], "rewards": []}], "grpo", r"responses.*non-empty"),
]


@pytest.mark.parametrize("case", FORWARD_BACKWARD, ids=[c[0] for c in FORWARD_BACKWARD])
def test_bad_batches_name_the_key_and_change_nothing(run, case):
    _, batch, loss_fn, match = case
    before = snapshot(run)
    with pytest.raises(ValueError, match=match):
        run.forward_backward(batch, loss_fn)
    assert_same(before, snapshot(run))


@pytest.mark.parametrize("op", ["score", "compute_logprobs"])
def test_sequence_requests_check_token_ids(run, op):
    with pytest.raises(ValueError, match=rf"{op}: batch\['input_ids'\].*vocabulary.*got {V}"):
        getattr(run, op)(seqs([[1, V]]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[1, 999]]), r"prompts\[0\].*vocabulary.*999"),
    (dict(prompts=[[1, -1]]), r"prompts\[0\].*-1"),
    (dict(prompts=["ab"], max_tokens=600), r"max_tokens.*512"),
    (dict(prompts=["ab"], seed="x"), r"seed"),
    (dict(prompts=["ab"], seed=True), r"seed"),
    (dict(prompts=["ab"], temperature=True), r"temperature"),
])
def test_sample_arguments(run, kwargs, match):
    before = snapshot(run)
    with pytest.raises(ValueError, match=match):
        run.sample(**kwargs)
    assert_same(before, snapshot(run))


@pytest.mark.parametrize("config, exc, match", [
    (dict(lora_alpha="x"), TypeError, "lora_alpha"),
    (dict(warmup_steps="x"), TypeError, "warmup_steps"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(seed=2**70), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(adam_betas=(0.9,)), TypeError, "adam_betas"),
    (dict(adam_betas=(0.9, 1.0)), ValueError, "adam_betas"),
    (dict(device="cuda:99"), ValueError, "device"),  # no machine has it (or no CUDA at all)
    (dict(device="tpu"), ValueError, "device"),
    (dict(lora_target_modules=123), TypeError, "lora_target_modules"),
    (dict(learning_rate=math.inf), ValueError, "learning_rate"),
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
    (dict(learning_rate=True), TypeError, "learning_rate"),
    (dict(adam_eps=0.0), ValueError, "adam_eps"),
    (dict(lora_r=2.5), TypeError, "lora_r"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(weight_decay=math.nan), ValueError, "weight_decay"),
    (dict(max_grad_norm=0), ValueError, "max_grad_norm"),
    (dict(total_steps=0), ValueError, "total_steps"),
    (dict(lr_scheduler="cosine"), ValueError, "total_steps"),
    (dict(value_head="yes"), TypeError, "value_head"),
    (dict(name="a\x00b"), ValueError, "name"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(base_model=""), ValueError, "base_model"),
    (dict(nonsense=1), TypeError, "unknown argument"),
])
def test_create_run_checks_every_field(engine, config, exc, match):
    n_runs = len(engine.list_runs())
    with pytest.raises(exc, match=match):
        engine.create_run(**config).result(timeout=30)
    assert len(engine.list_runs()) == n_runs


def test_an_unknown_model_name_is_reported_offline_and_under_its_argument(engine, run):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^base_model: could not load 'no-such-model'"):
        engine.create_run(base_model="no-such-model").result(timeout=60)
    with pytest.raises(ValueError, match=r"^reference_model: could not load 'no-such-model'"):
        engine.request(run.run_id, "forward_backward", [{"prompt": "a", "chosen": "b", "rejected": "c"}], "dpo",
                       {"reference_model": "no-such-model"}).result(timeout=60)
    assert time.perf_counter() - t0 < 20  # no network retries


def test_optim_step_refuses_bools_and_an_empty_accumulation(make_run):
    run = make_run(lora_r=4)
    before = snapshot(run)
    with pytest.raises(ValueError, match="forward_backward"):
        run.optim_step()
    assert_same(before, snapshot(run))
    run.forward_backward(SFT, "causal_lm")
    before = snapshot(run)
    with pytest.raises(ValueError, match="learning_rate"):
        run.optim_step(learning_rate=True)
    assert_same(before, snapshot(run))
    assert run.optim_step().step == 1


def test_a_request_over_the_memory_limit_is_refused_up_front(tmp_path):
    eng = Engine(str(tmp_path), max_request_bytes=50 << 20)
    try:
        rid = eng.create_run(lora_r=4).result(timeout=60)["run_id"]
        run = eng._run(rid)
        before = snapshot(run)
        big = seqs(torch.ones(64, 512, dtype=torch.long).tolist())
        with pytest.raises(RequestTooLargeError, match=r"batch_data: .*memory limit of 0\.05 GiB.*64 sequences × 512"):
            eng.request(rid, "forward_backward", big, "causal_lm").result(timeout=60)
        with pytest.raises(ValueError, match="sample: .*memory limit"):
            eng.request(rid, "sample", ["a"] * 64, max_tokens=500, num_samples=4).result(timeout=60)
        assert_same(before, snapshot(run))
        assert eng.request(rid, "forward_backward", SFT, "causal_lm").result(timeout=60).loss > 0
    finally:
        eng.close()
    with pytest.raises(ValueError, match="max_request_bytes"):
        Engine(str(tmp_path), max_request_bytes=0)


def test_queue_stats_of_an_unknown_run_raises_and_creates_nothing(engine):
    with pytest.raises(RunNotFoundError):
        engine.queue_stats("no-such-run")
    fut = engine.request("no-such-run", "optim_step")
    with pytest.raises(RunNotFoundError):
        fut.result(timeout=10)
    assert "no-such-run" not in engine.queue_stats()


def test_a_cancelled_request_leaves_consistent_stats(engine, run):
    gate = threading.Event()
    blocker = engine._worker("cpu").submit(gate.wait, key="blocker")
    try:
        fut = engine.request(run.run_id, "compute_logprobs", SFT)
        assert fut.cancel()
    finally:
        gate.set()
    blocker.result(timeout=30)
    engine.request(run.run_id, "compute_logprobs", SFT).result(timeout=30)
    stats = engine.queue_stats(run.run_id)
    assert stats["cancelled"] >= 1 and stats["pending"] == 0
    assert stats["submitted"] == stats["completed"] + stats["failed"] + stats["cancelled"]


def test_runs_share_a_device_fairly_and_keep_their_own_order():
    worker = DeviceWorker("test")
    gate, order = threading.Event(), []
    try:
        futs = [worker.submit(gate.wait, key="a")]
        futs += [worker.submit(lambda i=i: order.append(("a", i)), key="a") for i in range(20)]
        futs += [worker.submit(lambda i=i: order.append(("b", i)), key="b") for i in range(2)]
        gate.set()
        concurrent.futures.wait(futs, timeout=30)
    finally:
        worker.close()
    assert [i for k, i in order if k == "a"] == list(range(20))  # FIFO within a run
    assert order.index(("b", 0)) <= 1 and order.index(("b", 1)) <= 3  # not behind a's backlog


def _grad_norm_after_one_step(engine, seed):
    rid = engine.create_run(lora_r=4, lora_dropout=0.5, seed=seed).result(timeout=60)["run_id"]
    engine.request(rid, "forward_backward", SFT, "causal_lm").result(timeout=60)
    return engine.request(rid, "optim_step").result(timeout=60).grad_norm


def test_the_seed_makes_lora_dropout_reproducible(engine):
    """Two runs with the same seed give the same gradients however the process's global RNG was used between
    them (a fresh process starts from another global state: this is the same situation)."""
    torch.manual_seed(1234)
    a = _grad_norm_after_one_step(engine, seed=3)
    torch.rand(1000)
    b = _grad_norm_after_one_step(engine, seed=3)
    c = _grad_norm_after_one_step(engine, seed=4)
    assert a == b and a != c


_FRESH = """
import sys, tempfile, torch
from signalrl.engine import Engine
torch.manual_seed(int(sys.argv[1]))  # a different global state in each process
eng = Engine(tempfile.mkdtemp())
rid = eng.create_run(lora_r=4, lora_dropout=0.5, seed=7).result(timeout=120)["run_id"]
batch = [{"prompt": "2+2=", "response": "4"}, {"prompt": "hello ", "response": "world"}]
eng.request(rid, "forward_backward", batch, "causal_lm").result(timeout=120)
print(repr(eng.request(rid, "optim_step").result(timeout=120).grad_norm))
eng.close()
"""


def test_the_seed_makes_a_fresh_process_reproducible(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _FRESH, str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path) for k in (1, 2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=180)
        finally:
            p.kill()
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip().splitlines()[-1])
    assert outs[0] == outs[1]
