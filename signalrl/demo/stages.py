"""The demo's stages through the public async client: SFT, reward model, PPO / GRPO / DPO, and the evaluation.

Each stage takes the client (or a training client), the :class:`~signalrl.demo.report.Recorder`, the
:class:`Settings` and the demo's ``random.Random``; the order of their draws from it is what makes a seed's
results reproducible.
"""
from __future__ import annotations

import os
import random
import statistics
import sys
from dataclasses import dataclass
from typing import Sequence

from .report import Recorder
from .task import make_prompt, preference_pair, sft_response, task_score


@dataclass
class Settings:
    sft_steps: int = 80
    sft_batch: int = 32
    sft_lr: float = 3e-3
    rm_steps: int = 60
    rm_batch: int = 32
    rm_lr: float = 1e-3
    rl_iters: int = 30
    rl_prompts: int = 32
    rl_lr: float = 3e-3  # 5e-3 collapsed the PPO policy on seed 0 (KL 0.5 → 5.7 in one iteration); 12 seeds improve at 3e-3
    ppo_beta: float = 0.02  # KL penalty coefficient of the PPO stage
    lora_r: int = 16
    grpo_group: int = 4
    dpo_steps: int = 40
    dpo_prompts: int = 32
    dpo_beta: float = 0.1
    eval_prompts: int = 64
    max_tokens: int = 12

    @classmethod
    def quick(cls) -> "Settings":
        return cls(sft_steps=20, rm_steps=15, rl_iters=3, rl_prompts=16, dpo_steps=4, dpo_prompts=16,
                   eval_prompts=8)


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=True, dynamic_ncols=True, file=sys.stderr)


async def evaluate(policy, rm, prompts: Sequence[str], max_tokens: int, rm_stats: tuple[float, float] | None,
                   seed: int = 1234) -> dict[str, float]:
    """Sample held-out prompts with a fixed seed; mean task score and (if an RM is given) mean RM score."""
    res = await policy.sample(list(prompts), max_tokens=max_tokens, temperature=1.0, num_samples=2, seed=seed)
    seqs = res.flat()
    out = {"task_score": statistics.fmean(task_score(s.text) for s in seqs),
           "length": statistics.fmean(len(s.text) for s in seqs)}
    if rm is not None:
        scores = (await rm.score([{"prompt": s.prompt_tokens, "response": s.tokens} for s in seqs])).rewards
        out["rm_score"] = statistics.fmean(scores)
        if rm_stats is not None:
            out["reward"] = (out["rm_score"] - rm_stats[0]) / rm_stats[1]
    out["examples"] = [s.text for s in seqs[:4]]
    return out


async def train_sft(client, rec: Recorder, cfg: Settings, rng: random.Random, out_dir: str | None, quiet: bool) -> str:
    run = await client.create_run(base_model="signal-tiny", lora_r=0, learning_rate=cfg.sft_lr, seed=0,
                                  name="sft", max_grad_norm=1.0)
    tc = client.get_training_client(run["run_id"])
    bar = _progress(cfg.sft_steps, "1/3 SFT", quiet)
    pending = None
    for step in range(cfg.sft_steps):
        batch = [{"prompt": make_prompt(rng), "response": sft_response(rng)} for _ in range(cfg.sft_batch)]
        # Pipelining: queue this step's work before waiting for the previous step's result.
        fb = await tc.forward_backward_async(batch, "causal_lm")
        st = await tc.optim_step_async()
        if pending is not None:
            _report_sft(rec, bar, *[await f for f in pending])
        pending = (fb, st)
    _report_sft(rec, bar, *[await f for f in pending])
    bar.close()
    # Remote (out_dir None): a directory of the server, relative to this API key's workspace there.
    target = os.path.join(out_dir, "sft_model") if out_dir is not None else f"signal-demo/{run['run_id']}/sft_model"
    return await tc.export_model(target, overwrite=True)


def _report_sft(rec: Recorder, bar, fb, st) -> None:
    rec.log("sft", st.step, loss=fb.loss, perplexity=fb.metrics["perplexity"], grad_norm=st.grad_norm)
    bar.set_postfix(loss=f"{fb.loss:.3f}")
    bar.update(1)


async def train_reward_model(client, rec: Recorder, cfg: Settings, rng: random.Random, sft_dir: str, quiet: bool):
    run = await client.create_run(base_model=sft_dir, lora_r=0, learning_rate=cfg.rm_lr, reward_head=True,
                                  name="reward_model")
    tc = client.get_training_client(run["run_id"])
    bar = _progress(cfg.rm_steps, "2/3 reward model", quiet)
    for step in range(cfg.rm_steps):
        batch = [preference_pair(rng) for _ in range(cfg.rm_batch)]
        fb = await tc.forward_backward(batch, "reward_modeling")
        st = await tc.optim_step()
        rec.log("reward_model", st.step, loss=fb.loss, accuracy=fb.metrics["preference_accuracy"],
                margin=fb.metrics["reward_margin"])
        bar.set_postfix(loss=f"{fb.loss:.3f}", acc=f"{fb.metrics['preference_accuracy']:.2f}")
        bar.update(1)
    bar.close()
    held_out = [preference_pair(random.Random(10_000 + i)) for i in range(128)]
    ev = await tc.forward(held_out, "reward_modeling")
    rec.log("reward_model_eval", cfg.rm_steps, accuracy=ev.metrics["preference_accuracy"])
    return tc, ev.metrics["preference_accuracy"]


async def reward_stats(policy, rm, prompts: Sequence[str], max_tokens: int) -> tuple[float, float]:
    """Mean and std of RM scores on samples of the initial policy: rewards are standardized with them."""
    res = await policy.sample(list(prompts), max_tokens=max_tokens, num_samples=2, seed=999)
    scores = (await rm.score([{"prompt": s.prompt_tokens, "response": s.tokens} for s in res.flat()])).rewards
    return statistics.fmean(scores), max(statistics.pstdev(scores), 1e-3)


async def train_ppo(policy, rm, rec: Recorder, cfg: Settings, rng: random.Random, rm_stats, quiet: bool) -> None:
    mean, std = rm_stats
    bar = _progress(cfg.rl_iters, "3/3 PPO", quiet)
    for it in range(cfg.rl_iters):
        prompts = [make_prompt(rng) for _ in range(cfg.rl_prompts)]
        seqs = (await policy.sample(prompts, max_tokens=cfg.max_tokens, temperature=1.0)).flat()
        scores = (await rm.score([{"prompt": s.prompt_tokens, "response": s.tokens} for s in seqs])).rewards
        batch = [{"prompt": s.prompt_tokens, "response": s.tokens, "old_log_probs": s.logprobs,
                  "rewards": (r - mean) / std} for s, r in zip(seqs, scores)]
        half = len(batch) // 2
        results = []
        for epoch in range(2):  # two PPO epochs of two minibatches each, all queued at once
            for mb in (batch[:half], batch[half:]):
                results.append(await policy.forward_backward_async(
                    mb, "enhanced_ppo", {"beta": cfg.ppo_beta, "entropy_coef": 0.0, "gamma": 1.0, "gae_lambda": 0.95}))
                results.append(await policy.optim_step_async())
        results = [await f for f in results]
        fb = [r for r in results[::2]]
        reward = statistics.fmean((r - mean) / std for r in scores)
        rec.log("ppo", it + 1, reward=reward, task_score=statistics.fmean(task_score(s.text) for s in seqs),
                loss=statistics.fmean(r.loss for r in fb), kl=fb[0].metrics["kl_divergence"],
                policy_loss=statistics.fmean(r.metrics["policy_loss"] for r in fb),
                value_loss=statistics.fmean(r.metrics["value_loss"] for r in fb),
                clip_fraction=statistics.fmean(r.metrics["clip_fraction"] for r in fb))
        bar.set_postfix(reward=f"{reward:+.2f}", kl=f"{fb[0].metrics['kl_divergence']:.3f}")
        bar.update(1)
    bar.close()


async def train_grpo(policy, rm, rec: Recorder, cfg: Settings, rng: random.Random, rm_stats, quiet: bool) -> None:
    mean, std = rm_stats
    bar = _progress(cfg.rl_iters, "3/3 GRPO", quiet)
    n_prompts = max(2, cfg.rl_prompts // cfg.grpo_group)
    for it in range(cfg.rl_iters):
        prompts = [make_prompt(rng) for _ in range(n_prompts)]
        res = await policy.sample(prompts, max_tokens=cfg.max_tokens, num_samples=cfg.grpo_group)
        seqs = res.flat()
        scores = (await rm.score([{"prompt": s.prompt_tokens, "response": s.tokens} for s in seqs])).rewards
        batch = []
        for i, group in enumerate(res.sequences):
            g_scores = scores[i * cfg.grpo_group:(i + 1) * cfg.grpo_group]
            batch.append({"prompt": group[0].prompt_tokens, "responses": [s.tokens for s in group],
                          "rewards": [(r - mean) / std for r in g_scores],
                          "old_log_probs": [s.logprobs for s in group]})
        futs = []
        for _ in range(2):
            futs.append(await policy.forward_backward_async(batch, "grpo", {"beta": 0.02}))
            futs.append(await policy.optim_step_async())
        results = [await f for f in futs]
        fb = results[0]
        reward = statistics.fmean((r - mean) / std for r in scores)
        rec.log("grpo", it + 1, reward=reward, task_score=statistics.fmean(task_score(s.text) for s in seqs),
                loss=fb.loss, kl=fb.metrics["kl_divergence"], policy_loss=fb.metrics["policy_loss"],
                clip_fraction=fb.metrics["clip_fraction"])
        bar.set_postfix(reward=f"{reward:+.2f}", kl=f"{fb.metrics['kl_divergence']:.3f}")
        bar.update(1)
    bar.close()


async def train_dpo(policy, rec: Recorder, cfg: Settings, rng: random.Random, quiet: bool) -> None:
    """Online DPO: each step samples two responses per prompt from the current policy and ranks them by
    the task score (ties dropped), so the pairs stay on-policy."""
    bar = _progress(cfg.dpo_steps, "2/2 DPO", quiet)
    for step in range(cfg.dpo_steps):
        prompts = [make_prompt(rng) for _ in range(cfg.dpo_prompts)]
        res = await policy.sample(prompts, max_tokens=cfg.max_tokens, num_samples=2)
        pairs = []
        for a, b in res.sequences:
            sa, sb = task_score(a.text), task_score(b.text)
            if sa != sb:
                c, r = (a, b) if sa > sb else (b, a)
                pairs.append({"prompt": c.prompt_tokens, "chosen": c.tokens, "rejected": r.tokens})
        if not pairs:
            continue
        fb = await policy.forward_backward(pairs, "dpo", {"beta": cfg.dpo_beta})
        st = await policy.optim_step()
        rec.log("dpo", st.step, loss=fb.loss, accuracy=fb.metrics["preference_accuracy"],
                margin=fb.metrics["reward_margin"], chosen_reward=fb.metrics["chosen_reward"],
                task_score=statistics.fmean(task_score(q.text) for q in res.flat()))
        bar.set_postfix(loss=f"{fb.loss:.3f}", acc=f"{fb.metrics['preference_accuracy']:.2f}")
        bar.update(1)
    bar.close()
