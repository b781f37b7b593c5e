"""``create_run(checkpoint_every=N)``: locally, checkpoint ``latest`` after every N-th step; on a server, its
numbered automatic checkpoints (what a restart resumes from). Bad values fail as every create_run field does."""
import asyncio

import pytest


def test_checkpoint_every(client, sft_batch):
    async def main():
        with pytest.raises(ValueError, match="checkpoint_every: expected an int >= 1 or None, got 0"):
            await client.create_run(lora_r=4, checkpoint_every=0)
        with pytest.raises(TypeError, match="checkpoint_every"):
            await client.create_run(lora_r=4, checkpoint_every="2")
        run = await client.create_run(lora_r=4, learning_rate=1e-2, checkpoint_every=2)
        assert run["config"]["checkpoint_every"] == 2
        tc = client.get_training_client(run["run_id"])
        steps = []
        for _ in range(3):
            await tc.forward_backward(sft_batch, "causal_lm")
            steps.append(await tc.optim_step())
        return steps, await tc.list_checkpoints(), await tc.get_metrics()

    steps, names, records = asyncio.run(main())
    assert [s.step for s in steps] == [1, 2, 3]
    if client.engine is not None:  # local: "latest", its path in the result
        assert steps[0].checkpoint is None and steps[1].checkpoint.endswith("/checkpoints/latest")
        assert steps[2].checkpoint is None and names == ["latest"]
    else:  # a server: auto-<execution order>, not in the user's metrics
        assert len(names) == 1 and names[0].startswith("auto-") and all(s.checkpoint is None for s in steps)
        assert "save_state" not in [r["op"] for r in records]
    assert [r["op"] for r in records if r["op"] == "optim_step"] == ["optim_step"] * 3
