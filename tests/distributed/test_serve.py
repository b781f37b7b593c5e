"""``signal serve --nproc-per-node 2``: the HTTP server over a sharded engine (torchrun, gloo on CPU), driven by the
unchanged remote client, gives the losses of a one-process run on the same inputs. Every wait is bounded; the
server's whole process group (torchrun and its ranks) is killed on the way out."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from _cases import batches, rel  # noqa: E402  (pytest puts this directory on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-6


def _env() -> dict:
    # the default backend (the native C++ kernels where they build), on the server's ranks and in the local run
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for name in ("TRITON_INTERPRET", "SIGNAL_BASE_URL", "SIGNAL_API_KEY"):
        env.pop(name, None)
    return env


def _train(client) -> list[float]:
    run = client.create_run(base_model="signal-tiny", lora_r=4, seed=5, learning_rate=1e-2).result()
    tc = client.get_training_client(run["run_id"])
    out = [tc.forward_backward(batches("grpo", 0), "grpo", {"beta": 0.01}).result().loss,
           tc.forward_backward(batches("causal_lm", 0), "causal_lm").result().loss]
    out.append(tc.optim_step().result().grad_norm)
    out.append(tc.forward_backward(batches("enhanced_ppo", 1), "enhanced_ppo").result().loss)
    out.append(tc.optim_step().result().grad_norm)
    out.append(tc.forward_backward(batches("causal_lm", 1), "causal_lm").result().loss)
    return out


def test_signal_serve_nproc_per_node_2_matches_one_process(tmp_path):
    from signalrl.client import SignalClient
    from signalrl.engine import Engine

    root = tmp_path / "server"
    env = _env()
    key = subprocess.run([sys.executable, "-m", "signalrl.cli", "keys", "create", "--root", str(root)], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()[0]
    proc = subprocess.Popen([sys.executable, "-m", "signalrl.cli", "serve", "--nproc-per-node", "2", "--root",
                             str(root), "--port", "0", "--dist-timeout", "60"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read():
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
    threading.Thread(target=read, daemon=True).start()
    try:
        url, ranks = None, None
        deadline = time.monotonic() + 180
        while url is None or ranks is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("signal serve --nproc-per-node 2 printed no URL in time:\n" + "".join(output))
            if m := re.search(r"Signal server on (http://\S+)", line):
                url = m.group(1)
            if m := re.search(r"Sharded engine: (\d+) ranks", line):
                ranks = int(m.group(1))
        assert ranks == 2
        try:
            with SignalClient(base_url=url, api_key=key, retry_deadline=60, result_timeout=300) as client:
                remote = _train(client)
        except Exception as exc:  # noqa: BLE001 - the server's side of the story
            pytest.fail(f"{type(exc).__name__}: {exc}\nserver output:\n" + "".join(output)[-6000:])
        engine = Engine(str(tmp_path / "local"))
        try:
            with SignalClient(engine=engine) as client:
                local = _train(client)
        finally:
            engine.close()
        assert max(rel(a, b) for a, b in zip(remote, local)) <= TOL, (remote, local)

        # SIGTERM (as torchrun or a service manager sends it): rank 0 shuts the server down and stops the others
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
