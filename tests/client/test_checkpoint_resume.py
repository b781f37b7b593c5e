"""save_state / load_state: continuing after a load gives the same losses as never having stopped."""
import asyncio
import json
import os

import pytest

CONFIG = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=2,
              total_steps=20, seed=5)


async def _steps(tc, n):
    """PPO-style steps: sampling (sampling RNG), PPO with a value head (heads in the checkpoint),
    LoRA dropout (global RNG), a scheduled learning rate."""
    out = []
    for _ in range(n):
        s = await tc.sample(["q>", "z>"], max_tokens=6, num_samples=2)
        batch = [{"prompt": q.prompt_tokens, "response": q.tokens, "old_log_probs": q.logprobs,
                  "rewards": float(q.text.count("a"))} for q in s.flat()]
        fb = await tc.forward_backward(batch, "enhanced_ppo")
        st = await tc.optim_step()
        out.append((tuple(tuple(q.tokens) for q in s.flat()), fb.loss, fb.metrics["value_loss"], st.grad_norm,
                    st.learning_rate))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_gives_identical_losses(client, optimizer):
    async def main():
        a = await client.create_run(optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, **CONFIG)
        ta = client.get_training_client(a["run_id"])
        await _steps(ta, 2)
        ck = await ta.save_state("mid")
        straight = await _steps(ta, 3)

        # A fresh run of the same configuration, restored from run a's checkpoint by path.
        b = await client.create_run(optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, **CONFIG)
        tb = client.get_training_client(b["run_id"])
        loaded = await tb.load_state(ck.path)
        resumed = await _steps(tb, 3)

        # Run a itself, rewound by name.
        await ta.load_state("mid")
        rewound = await _steps(ta, 3)
        return ck, loaded, straight, resumed, rewound, (await client.get_run(b["run_id"]))

    ck, loaded, straight, resumed, rewound, info_b = asyncio.run(main())
    assert ck.step == 2 and loaded.step == 2 and info_b["step"] == 5 and info_b["heads"] == ["value"]
    assert resumed == straight  # tokens, losses, grad norms, learning rates: exactly equal
    assert rewound == straight
    assert sorted(os.listdir(ck.path)) == ["optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors",
                                           "scheduler.json", "state.json", "weights.safetensors"]
    with open(os.path.join(ck.path, "state.json")) as f:
        assert json.load(f)["step"] == 2


def test_load_errors(client):
    async def main():
        a = await client.create_run(lora_r=4)
        ta = client.get_training_client(a["run_id"])
        ck = await ta.save_state("x")
        full = await client.create_run(lora_r=0)
        tf = client.get_training_client(full["run_id"])
        with pytest.raises(ValueError, match="does not match"):
            await tf.load_state(ck.path)
        other_base = await client.create_run(lora_r=4, seed=123)  # other frozen base weights
        with pytest.raises(ValueError, match="different frozen base"):
            await client.get_training_client(other_base["run_id"]).load_state(ck.path)
        with pytest.raises(ValueError, match="no checkpoint"):
            await ta.load_state("never-saved")
        with pytest.raises(ValueError, match="name"):
            await ta.save_state("../escape")

    asyncio.run(main())


def test_metrics_jsonl_has_every_result(client, engine, sft_batch):
    async def main():
        a = await client.create_run(lora_r=4)
        ta = client.get_training_client(a["run_id"])
        await ta.forward_backward(sft_batch, "causal_lm")
        await ta.optim_step()
        await ta.forward(sft_batch, "causal_lm")
        return await client.get_run(a["run_id"])

    info = asyncio.run(main())
    with open(info["metrics_path"]) as f:
        rows = [json.loads(line) for line in f]
    assert [r["op"] for r in rows] == ["forward_backward", "optim_step", "forward"]
    assert rows[0]["loss"] == rows[0]["metrics"]["loss"] and "perplexity" in rows[0]["metrics"]
    assert rows[0]["step"] == 0 and rows[1]["step"] == 1 and rows[2]["step"] == 1 and rows[1]["grad_norm"] > 0
