"""DPO on preference pairs given as text, on the embedded default model.

    python examples/dpo.py [--quick]

The pairs prefer answers written in lowercase letters over shouted ones; the base model is a LoRA run,
so the reference is the same model with adapters disabled (no second copy in memory).
"""
import argparse
import asyncio
import os
import random

from signalrl.client import AsyncSignalClient


def make_pairs(n: int, rng: random.Random) -> list[dict]:
    words = ["apple", "river", "stone", "cloud", "light", "quiet", "green", "north"]
    pairs = []
    for _ in range(n):
        w = rng.sample(words, 2)
        prompt = f"Say {w[0]} {w[1]}:"
        pairs.append({"prompt": prompt, "chosen": f" {w[0]} {w[1]}", "rejected": f" {w[0].upper()} {w[1].upper()}!"})
    return pairs


async def main(quick: bool = False) -> dict:
    client = AsyncSignalClient()
    run = await client.create_run(base_model="signal-tiny", lora_r=16, lora_alpha=32, learning_rate=2e-3)
    training_client = client.get_training_client(run["run_id"])
    rng = random.Random(0)
    held_out = make_pairs(32, random.Random(1))
    before = await training_client.forward(held_out, "dpo", {"beta": 0.1})

    for step in range(4 if quick else 40):
        # Text pairs are tokenized with the run's tokenizer; only response tokens count.
        result = await training_client.forward_backward(make_pairs(16, rng), "dpo", {"beta": 0.1})
        await training_client.optim_step()
        if step % 5 == 0:
            print(f"step {step:2d}  loss {result.loss:.4f}  accuracy {result.metrics['preference_accuracy']:.2f}  "
                  f"margin {result.metrics['reward_margin']:+.3f}")

    after = await training_client.forward(held_out, "dpo", {"beta": 0.1})
    print(f"held-out DPO loss {before.loss:.4f} -> {after.loss:.4f}; "
          f"reward margin {before.metrics['reward_margin']:+.3f} -> {after.metrics['reward_margin']:+.3f}")
    return {"before": before.loss, "after": after.loss}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("SIGNAL_EXAMPLES_QUICK")))
    asyncio.run(main(parser.parse_args().quick))
