"""The examples and ``signal demo`` run unchanged against a server (loopback), and the demo prints the same
before/after table as the local demo with the same seed."""
import os
import re
import subprocess
import sys

import pytest

from signalrl.server import auth
from signalrl.server.thread import ServerThread

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def remote(engine, tmp_path_factory):
    from signalrl.server import Service

    service = Service(str(tmp_path_factory.mktemp("examples-server")), engine=engine)
    _, key = auth.create_key(service.store, "examples")
    with ServerThread(service) as url:
        yield url, key


@pytest.mark.parametrize("name", ["ppo_gae", "dpo", "grpo", "futures_pipelining"])
def test_example_runs_against_a_server(name, remote, tmp_path):
    url, key = remote
    env = dict(os.environ, SIGNAL_EXAMPLES_QUICK="1", SIGNAL_BASE_URL=url, SIGNAL_API_KEY=key,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")  # the runs live on the server, not here
    if name == "futures_pipelining":
        assert "identical losses" in proc.stdout


def _table(text):
    return [line for line in text.splitlines() if line.strip() and not line.startswith("finished in")]


def test_demo_remote_prints_the_local_table(remote, tmp_path, capsys):
    from signalrl.demo import main

    url, key = remote
    assert main(["--quick", "--quiet", "--seed", "3", "--out", str(tmp_path / "local")]) == 0
    local = capsys.readouterr().out
    assert main(["--quick", "--quiet", "--seed", "3", "--out", str(tmp_path / "remote"), "--remote", url,
                 "--api-key", key]) == 0
    remote_out = capsys.readouterr().out
    assert re.search(r"reward before PPO: [+-]\d", remote_out)
    assert _table(remote_out) == _table(local)
    assert not os.path.exists(tmp_path / "remote" / "runs") and not os.path.exists(tmp_path / "remote" / "sft_model")


def test_remote_demo_benchmark_quick(tmp_path):
    """benchmarks/remote_demo.py end to end on the demo's quick settings: a real `signal serve` per engine (process,
    thread), one local demo and one on each server, the same table from all three (the script exits otherwise), and a
    results file that says so."""
    out = tmp_path / "remote_demo.md"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.remote_demo", "--quick", "--repeats", "1", "--warmup", "0",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert re.search(r"\| local \| 1 \| \d+\.\d\d \|", text)
    for engine in ("process", "thread"):
        assert re.search(rf"\| remote \({engine}\) \| 1 \| \d+\.\d\d \|", text)
        assert re.search(rf"remote \({engine}\) \*\*\d+\.\d\d×\*\*", text)
    assert "Every run printed the same table" in text
