"""Errors come from the awaited call with clear messages, leave the run bit-exactly as it was, and
later requests still execute."""
import asyncio

import pytest
import torch

from signalrl.client import RunNotFoundError

from _run_state import assert_same, snapshot


def ppo_batch(run, n=4):
    s = run.sample(["ab>"] * n, max_tokens=5, num_samples=1, seed=0).flat()
    return [{"prompt": q.prompt_tokens, "response": q.tokens, "old_log_probs": q.logprobs,
             "rewards": float(i % 2)} for i, q in enumerate(s)]


@pytest.mark.parametrize("lora_r", [4, 0])
def test_failed_requests_leave_state_untouched(client, engine, sft_batch, lora_r):
    async def main():
        info = await client.create_run(lora_r=lora_r, learning_rate=1e-2)
        tc = client.get_training_client(info["run_id"])
        run = engine._run(info["run_id"])
        await tc.forward_backward(sft_batch, "causal_lm")
        await tc.optim_step()  # optimizer state exists
        await tc.forward_backward(sft_batch, "causal_lm")  # accumulated gradients exist
        before = snapshot(run)
        good_ppo = ppo_batch(run)

        failures = [
            (dict(batch_data=sft_batch, loss_fn="nope"), ValueError, "unknown loss_fn 'nope'.*causal_lm"),
            (dict(batch_data=sft_batch, loss_fn="causal_lm", loss_kwargs={"temprature": 1.0}), ValueError,
             "temprature"),
            (dict(batch_data=good_ppo, loss_fn="enhanced_ppo", loss_kwargs={"clip_eps": 0.3}), ValueError,
             "clip_epsilon"),
            (dict(batch_data=good_ppo, loss_fn="enhanced_ppo", loss_kwargs={"gamma": 2.0}), ValueError, "gamma"),
            (dict(batch_data={"input_ids": torch.ones(2, 3, dtype=torch.long)}, loss_fn="enhanced_ppo"),
             ValueError, "attention_mask"),
            (dict(batch_data={"input_ids": torch.ones(2, 3, dtype=torch.long),
                              "attention_mask": torch.ones(2, 4, dtype=torch.long)}, loss_fn="causal_lm"),
             ValueError, "attention_mask"),
            (dict(batch_data=[{"nothing": 1}], loss_fn="causal_lm"), ValueError, "needs 'text'"),
            (dict(batch_data=sft_batch, loss_fn="causal_lm", loss_kwargs="x"), TypeError, "loss_kwargs"),
        ]
        for kwargs, exc, match in failures:
            with pytest.raises(exc, match=match):
                await tc.forward_backward(**kwargs)
            assert_same(before, snapshot(run))

        # Non-finite loss: raises before any gradient is accumulated.
        bad = [dict(ex, rewards=1e30) for ex in good_ppo]  # finite inputs, an infinite loss
        with pytest.raises(FloatingPointError):
            await tc.forward_backward(bad, "enhanced_ppo")
        assert_same(before, snapshot(run))
        # NaN log-probs where they count: a named error before any compute.
        bad = [dict(ex, old_log_probs=[float("nan")] * len(ex["old_log_probs"])) for ex in good_ppo]
        with pytest.raises(ValueError, match="old_log_probs.*finite"):
            await tc.forward_backward(bad, "enhanced_ppo")
        assert_same(before, snapshot(run))

        # A failure in the middle of backward (a hook that raises): gradients/heads/optimizer restored.
        target = next(p for _, p in run.trainable_parameters())
        handle = target.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom in backward")))
        try:
            with pytest.raises(RuntimeError, match="boom in backward"):
                await tc.forward_backward(good_ppo, "enhanced_ppo")  # would create the value head
        finally:
            handle.remove()
        assert_same(before, snapshot(run))
        # A finite loss with NaN gradients: nothing is accumulated.
        handle = target.register_hook(lambda g: g * float("nan"))
        try:
            with pytest.raises(FloatingPointError, match="non-finite gradients"):
                await tc.forward_backward(sft_batch, "causal_lm")
        finally:
            handle.remove()
        assert_same(before, snapshot(run))
        with pytest.raises(ValueError, match="learning_rate"):
            await tc.optim_step(learning_rate=-1.0)
        assert_same(before, snapshot(run))

        # Later requests still execute, and the gradients accumulate on top of the ones kept.
        res = await tc.forward_backward(good_ppo, "enhanced_ppo")
        assert "value" in run.heads and res.loss == res.metrics["loss"]
        step = await tc.optim_step()
        assert step.step == 2 and step.grad_norm > 0
        return await tc.queue_stats()

    stats = asyncio.run(main())
    assert stats["failed"] == 13 and stats["pending"] == 0


def test_unknown_run_is_raised_from_the_awaited_call(client, sft_batch):
    async def main():
        tc = client.get_training_client("run-does-not-exist")  # no error yet
        fut = await tc.forward_backward_async(sft_batch, "causal_lm")
        with pytest.raises(RunNotFoundError, match="run-does-not-exist"):
            await fut
        with pytest.raises(RunNotFoundError):
            await tc.optim_step()
        with pytest.raises(RunNotFoundError):
            await client.get_run("run-does-not-exist")

    asyncio.run(main())


def test_bad_create_run_arguments(client):
    async def main():
        with pytest.raises(TypeError, match="lora_rank"):
            await client.create_run(lora_rank=8)
        with pytest.raises(ValueError, match="optimizer"):
            await client.create_run(optimizer="adam")
        with pytest.raises(ValueError, match="bitsandbytes"):
            await client.create_run(optimizer="adamw_8bit")
        with pytest.raises(ValueError, match="base_model: could not load"):
            await client.create_run(base_model="/no/such/model/dir")

    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    asyncio.run(main())


def test_text_batches_equal_tensor_batches(client, engine):
    from signalrl.engine.tokenizer import byte_tokenizer

    async def main():
        info = await client.create_run(lora_r=0)
        tc = client.get_training_client(info["run_id"])
        tok = byte_tokenizer()
        texts = ["short", "a somewhat longer text"]
        enc = [tok.encode(t) + [tok.eos_token_id] for t in texts]
        T = max(map(len, enc))
        tensors = {"input_ids": torch.tensor([e + [0] * (T - len(e)) for e in enc]),
                   "attention_mask": torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc])}
        a = await tc.forward([{"text": t} for t in texts], "causal_lm")
        b = await tc.forward(tensors, "causal_lm")
        c = await tc.forward({"text": texts}, "causal_lm")
        return a, b, c

    a, b, c = asyncio.run(main())
    assert a.loss == b.loss == c.loss and a.num_tokens == b.num_tokens == (5 + 2) + (22 + 2)
