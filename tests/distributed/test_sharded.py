"""Sharded runs (FSDP2, gloo on CPU) against one process: each job starts its process group once and runs many
checks inside it (tests/distributed/_worker.py); every job is bounded by a timeout, so a bug is a failure."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Job:
    """``world`` processes with torchrun's environment (no torchrun agent: a rank that dies is not followed by the
    agent killing the others, so the survivors' reports can be read). Started at once; :meth:`report` waits."""

    def __init__(self, mode: str, world: int, tmp_path, timeout_s: float, job_timeout: float):
        self.mode, self.world, self.tmp = mode, world, tmp_path
        self.out = tmp_path / f"{mode}-{world}.json"
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1", SIGNAL_DIST_TIMEOUT=str(timeout_s), PYTHONPATH=ROOT)
        env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for the kernel tests: ops would run interpreted
        # the default backend: the native C++ kernels where they build (the fused linear ops on the sharded head)
        self.procs, self.logs = [], []
        for rank in range(world):
            log = open(tmp_path / f"{mode}-{world}-rank{rank}.log", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, WORKER, mode, str(self.out), str(tmp_path / f"root-{mode}-{world}")],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        self.deadline = time.monotonic() + job_timeout

    def report(self) -> dict:
        procs = self.procs
        try:
            # done when every rank has exited, or rank 0 has (it writes the report; a hung rank is then killed)
            while time.monotonic() < self.deadline and any(p.poll() is None for p in procs) \
                    and procs[0].poll() is None:
                time.sleep(0.1)
            grace = time.monotonic() + 3  # the others exit with rank 0 (a hung rank is killed after this)
            while time.monotonic() < min(grace, self.deadline) and any(p.poll() is None for p in procs):
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        text = ""
        for rank, log in enumerate(self.logs):
            log.seek(0)
            text += f"--- rank {rank} (exit {procs[rank].returncode})\n" + log.read()[-3000:]
            log.close()
        if not self.out.exists():
            pytest.fail(f"{self.mode} job (world {self.world}) wrote no report:\n{text}")
        return json.loads(self.out.read_text())


@pytest.mark.parametrize("world", [2, 3])
def test_parity_failures_checkpoints_sampling_client(world, tmp_path):
    r = _Job("parity", world, tmp_path, timeout_s=60, job_timeout=480).report()
    print(world, "ranks: seconds per phase", r["phases"])
    assert len(r["rows"]) == 14  # 7 losses x (LoRA + AdamW, full fine-tuning + SGD)
    for row in r["rows"]:
        assert row["metrics_rel"] <= TOL, row  # loss and every metric, both accumulated calls
        assert row["grads_rel"] <= TOL, row  # the accumulated gradients
        assert row["grad_norm_rel"] <= TOL, row
        assert row["clipped"][0] == row["clipped"][1], row
        # the sharded optimizer step is the one-process step on the same (sharded) gradients
        assert row["step_rel"] <= TOL, row
        if row["optimizer"] == "sgd":
            assert row["weights_rel"] <= TOL, row  # elementwise, on the model's scale
        else:
            # AdamW: normwise over the trainable state (measured <= 1e-6; the margin is for elements whose clipped
            # gradient lies within a few eps of 0, where AdamW amplifies float32 reduction order ~1e4x: see
            # docs/distributed.md, "Weights after AdamW")
            assert row["weights_norm_rel"] <= 1e-5, row
    bad = {k: v for k, v in r["checks"].items() if not v["ok"]}
    assert not bad, bad
    # per configuration: NaN x2, bad input, sampling, checkpoints x2, native kernels, export; then export refusal and
    # overwrite, the client's losses and its export
    assert len(r["checks"]) == 19
    be = r["backend"]
    print("backend", be, "export", r.get("export_lora4"), r.get("export_lora0"))
    if be["expect_native"]:  # the native kernels ran (not a silent fallback to the reference)
        assert be["linear_token_logprobs_fwd"] == be["linear_token_logprobs_bwd"] == "native", be


def test_dead_or_hung_rank_is_a_clear_error_within_the_timeout(tmp_path):
    timeout_s = 8.0
    # both jobs at once: they spend most of their time waiting for the dead or hung rank
    jobs = {mode: _Job(mode, 2, tmp_path, timeout_s=timeout_s, job_timeout=120) for mode in ("kill", "hang")}
    for mode, job in jobs.items():
        r = job.report()
        print(mode, r)
        assert r["error"] is not None and "RankFailedError" in r["error"], r
        assert r["elapsed"] < 3 * timeout_s, r  # the timeout, twice at most (the op, then the status exchange)
        assert r["later"] is not None and "RankFailedError" in r["later"] and r["later_s"] < 1.0, r
