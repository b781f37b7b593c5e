"""kill -9 of the server during training, restart, continue: no completed step is lost, accepted requests run
(or fail with a reason), undelivered results are still there, and the resumed run's losses equal those of a run
that was never interrupted."""
import asyncio
import math
import sqlite3
import time

import pytest
from _proc import ServerProcess, alive
from signalrl.client import AsyncSignalClient
from signalrl.server import auth
from signalrl.server.store import Store

CONFIG = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=1,
              total_steps=20, seed=5, checkpoint_every=2)
PPO = {"beta": 0.01}
EVAL = [{"text": "the quick brown fox jumps over the lazy dog " * 3}] * 16


async def _rollout(tc):
    s = await tc.sample(["q>", "z>"], max_tokens=6, num_samples=2)
    return s, [{"prompt": q.prompt_tokens, "response": q.tokens, "old_log_probs": q.logprobs,
                "rewards": float(q.text.count("a"))} for q in s.flat()]


def _record(s, fb, st):
    return (tuple(tuple(q.tokens) for q in s.flat()), fb.loss, fb.metrics["value_loss"], st.grad_norm,
            st.learning_rate, st.step)


async def _steps(tc, n):
    out = []
    for _ in range(n):
        s, batch = await _rollout(tc)
        fb = await tc.forward_backward(batch, "enhanced_ppo", PPO)
        st = await tc.optim_step()
        out.append(_record(s, fb, st))
    return out


@pytest.mark.parametrize("engine", ["process", "thread"])
def test_kill_9_and_restart_lose_nothing(tmp_path, engine):
    """``engine``: where ``signal serve`` runs the engine (``--engine``); in a child process, that child must die
    with the server (no orphan keeps training or writing the log)."""
    root = tmp_path / "server"
    root.mkdir()
    _, key = auth.create_key(Store(str(root / "signal.db")), "restart")
    args = ("--engine", engine)
    server = ServerProcess(root, args=args)
    try:
        client = AsyncSignalClient(base_url=server.url, api_key=key, retry_deadline=180, result_timeout=600,
                                   poll_hold=2)

        async def before_kill():
            ref = await client.create_run(**CONFIG)
            straight = await _steps(client.get_training_client(ref["run_id"]), 6)  # never interrupted
            run = await client.create_run(**CONFIG)
            tc = client.get_training_client(run["run_id"])
            first = await _steps(tc, 2)  # step 2: an automatic checkpoint
            s, batch = await _rollout(tc)  # step 3 (no checkpoint: replayed from the log after the restart)
            pending = [await tc.forward_backward_async(batch, "enhanced_ppo", PPO), await tc.optim_step_async()]
            pending += [await tc.forward_async(EVAL, "causal_lm") for _ in range(12)]
            return ref["run_id"], run["run_id"], straight, first, s, tc, pending

        loop = asyncio.new_event_loop()
        ref_id, run_id, straight, first, s4, tc, pending = loop.run_until_complete(before_kill())
        children = server.children()
        assert len(children) == (1 if engine == "process" else 0), children
        server.kill()  # kill -9 while requests are queued and running
        deadline = time.monotonic() + 10
        while any(alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(c) for c in children), "the engine process outlived the server"

        db = sqlite3.connect(str(root / "signal.db"))
        states = dict(db.execute("SELECT status, COUNT(*) FROM requests WHERE run_id = ? GROUP BY status",
                                 (run_id,)).fetchall())
        db.close()
        assert states.get("queued", 0) > 0, (states, server.output)  # accepted and not finished when it died

        server = ServerProcess(root, port=server.port, args=args)  # same root, same address

        async def after_restart():
            runs = {r["run_id"]: r for r in await client.list_runs()}
            done = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f.concurrent_future)
                                                           for f in pending)), timeout=300)
            rest = await _steps(tc, 3)
            return runs, done, rest, await client.get_run(run_id)

        runs, done, rest, info = loop.run_until_complete(after_restart())
        loop.run_until_complete(client.close())
        loop.close()
    finally:
        server.kill()

    assert set(runs) == {ref_id, run_id}
    assert runs[ref_id]["step"] == 6 and runs[run_id]["step"] >= 2  # listed again with their steps ...
    assert runs[run_id]["config"]["checkpoint_every"] == 2 and runs[run_id]["config"]["seed"] == 5  # ... and config
    fb, st, *evals = done
    resumed = first + [_record(s4, fb, st)] + rest
    assert resumed == straight  # tokens, losses, value losses, grad norms, learning rates, steps: exactly equal
    assert len({e.loss for e in evals}) == 1 and math.isfinite(evals[0].loss)  # same weights before and after
    assert info["step"] == 6
