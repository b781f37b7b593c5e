"""The examples and ``signal demo`` run as is on the embedded default (quick settings)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["ppo_gae", "dpo", "grpo", "futures_pipelining"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    env = dict(os.environ, SIGNAL_EXAMPLES_QUICK="1", SIGNAL_HOME=str(tmp_path),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # tests/conftest.py sets TRITON_INTERPRET=1 for the kernel tests; a user's CPU run has no interpreter.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py")], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path), "runs should write their metrics under SIGNAL_HOME"
    if name == "futures_pipelining":
        assert "identical losses" in proc.stdout


@pytest.mark.parametrize("algo", ["ppo", "grpo", "dpo"])
def test_demo_quick(algo, tmp_path, capsys):
    from signalrl.demo import main

    out = tmp_path / "demo"
    assert main(["--quick", "--quiet", "--algo", algo, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"reward before {algo.upper()}" in text and "after" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo and summary["reward_before"] is not None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in rows}
    assert {"sft", "summary"} <= stages and (algo in stages)
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "sft_model" / "config.json").exists()


def test_demo_default_ppo_improves_the_reward(tmp_path, capsys):
    """The README's main job with its default settings: the reward after PPO is higher than before (exit 0)."""
    from signalrl.demo import main

    out = tmp_path / "demo"
    assert main(["--quiet", "--out", str(out)]) == 0, capsys.readouterr().out[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["improved"] and summary["reward_after"] > summary["reward_before"] + 0.5, summary
    assert summary["task_score_after"] > summary["task_score_before"], summary
