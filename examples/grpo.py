"""GRPO: groups of sampled responses per prompt, advantages relative to the group.

    python examples/grpo.py [--quick]

Toy reward: how many of the generated characters are digits (the fresh ``signal-tiny`` rarely makes any).
"""
import argparse
import asyncio
import os
import statistics

from signalrl.client import AsyncSignalClient


def reward_fn(text: str) -> float:
    return sum(c.isdigit() for c in text) / max(len(text), 1)


async def main(quick: bool = False) -> float:
    client = AsyncSignalClient()
    # Full fine-tuning of the randomly initialized built-in (see examples/ppo_gae.py for why not LoRA here).
    run = await client.create_run(base_model="signal-tiny", lora_r=0, learning_rate=3e-3)
    training_client = client.get_training_client(run["run_id"])
    prompts = ["Count:", "Numbers:", "Digits please:", "Phone:"]
    group_size = 4 if quick else 8

    history = []
    for iteration in range(3 if quick else 20):
        res = await training_client.sample(prompts, max_tokens=12, temperature=1.0, num_samples=group_size)
        batch = [{"prompt": group[0].prompt_tokens,
                  "responses": [s.tokens for s in group],
                  "rewards": [reward_fn(s.text) for s in group],
                  "old_log_probs": [s.logprobs for s in group]}
                 for group in res.sequences]
        result = await training_client.forward_backward(batch, "grpo", {"beta": 0.01, "clip_epsilon": 0.2})
        await training_client.optim_step()
        mean_reward = statistics.fmean(r for b in batch for r in b["rewards"])
        history.append(mean_reward)
        print(f"iter {iteration:2d}  reward {mean_reward:.3f}  loss {result.loss:+.4f}  "
              f"kl {result.metrics['kl_divergence']:.4f}  reward_std {result.metrics['reward_std']:.3f}")
    print(f"reward: first {history[0]:.3f}, last {history[-1]:.3f}")
    return history[-1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("SIGNAL_EXAMPLES_QUICK")))
    asyncio.run(main(parser.parse_args().quick))
