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


def _launch(mode: str, world: int, tmp_path, timeout_s: float, job_timeout: float) -> dict:
    """``world`` processes with torchrun's environment (no torchrun agent: a rank that dies is not followed by
    the agent killing the others, so the survivors' reports can be read)."""
    out = tmp_path / f"{mode}-{world}.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", SIGNAL_DIST_TIMEOUT=str(timeout_s), PYTHONPATH=ROOT)
    procs = []
    logs = []
    for rank in range(world):
        log = open(tmp_path / f"{mode}-{world}-rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, WORKER, mode, str(out), str(tmp_path / f"root-{mode}-{world}")],
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    deadline = time.monotonic() + job_timeout
    try:
        # done when every rank has exited, or rank 0 has (it writes the report; a hung rank is then killed)
        while time.monotonic() < deadline and any(p.poll() is None for p in procs) and procs[0].poll() is None:
            time.sleep(0.1)
        grace = time.monotonic() + 10
        while time.monotonic() < min(grace, deadline) and any(p.poll() is None for p in procs):
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        text += f"--- rank {rank} (exit {procs[rank].returncode})\n" + log.read()[-3000:]
        log.close()
    if not out.exists():
        pytest.fail(f"{mode} job (world {world}) wrote no report:\n{text}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("world", [2, 3])
def test_parity_failures_checkpoints_sampling_client(world, tmp_path):
    r = _launch("parity", world, tmp_path, timeout_s=60, job_timeout=480)
    assert len(r["rows"]) == 14  # 7 losses x (LoRA + AdamW, full fine-tuning + SGD)
    for row in r["rows"]:
        assert row["metrics_rel"] <= TOL, row  # loss and every metric, both accumulated calls
        assert row["grads_rel"] <= TOL, row  # the accumulated gradients
        assert row["grad_norm_rel"] <= TOL, row
        assert row["clipped"][0] == row["clipped"][1], row
        assert row["weights_rel"] <= (TOL if row["optimizer"] == "sgd" else 1e-3), row  # Adam: see docs/distributed.md
    bad = {k: v for k, v in r["checks"].items() if not v["ok"]}
    assert not bad, bad
    assert len(r["checks"]) == 13


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_dead_or_hung_rank_is_a_clear_error_within_the_timeout(mode, tmp_path):
    timeout_s = 8.0
    r = _launch(mode, 2, tmp_path, timeout_s=timeout_s, job_timeout=120)
    print(mode, r)
    assert r["error"] is not None and "RankFailedError" in r["error"], r
    assert r["elapsed"] < 3 * timeout_s, r  # the timeout, twice at most (the op, then the status exchange)
    assert r["later"] is not None and "RankFailedError" in r["later"] and r["later_s"] < 1.0, r
