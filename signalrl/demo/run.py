"""``signal demo``: :func:`run_demo` runs the stages of :mod:`signalrl.demo` in order (locally or on a server),
writes the summary and prints the table; :func:`main` is the command line."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any, Sequence

from .report import Recorder, plot_curves, print_table
from .stages import (Settings, evaluate, reward_stats, train_dpo, train_grpo, train_ppo, train_reward_model,
                     train_sft)
from .task import make_prompt

DESCRIPTION = "``signal demo``: the three-stage RLHF pipeline, end to end, through the public client."

async def run_demo(algo: str = "ppo", out_dir: str = "demo_out", quick: bool = False, seed: int = 0,
                   quiet: bool = False, remote: str | None = None, api_key: str | None = None) -> dict[str, Any]:
    """Run the pipeline; returns the summary (also written to ``<out_dir>/summary.json``). ``remote``: the URL of a
    ``signal serve`` server to train on (``api_key`` or ``$SIGNAL_API_KEY``) instead of a local engine."""
    from signalrl.client import AsyncSignalClient
    from signalrl.engine import Engine

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars would interleave with ours
    torch.manual_seed(seed)
    cfg = Settings.quick() if quick else Settings()
    os.makedirs(out_dir, exist_ok=True)
    rec = Recorder(os.path.join(out_dir, "metrics.jsonl"))
    rng = random.Random(seed)
    eval_prompts = [make_prompt(random.Random(50_000 + i)) for i in range(cfg.eval_prompts)]
    t0 = time.perf_counter()
    if remote:
        client = AsyncSignalClient(base_url=remote, api_key=api_key)
    else:
        client = AsyncSignalClient(engine=Engine(os.path.join(out_dir, "runs")))
    try:
        sft_dir = await train_sft(client, rec, cfg, rng, None if remote else out_dir, quiet)
        rm, rm_acc, rm_stats = None, None, None
        if algo in ("ppo", "grpo"):
            rm, rm_acc = await train_reward_model(client, rec, cfg, rng, sft_dir, quiet)
        run = await client.create_run(base_model=sft_dir, lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                                      learning_rate=cfg.rl_lr if algo != "dpo" else cfg.rl_lr / 2,
                                      name=f"{algo}_policy", max_grad_norm=1.0)
        policy = client.get_training_client(run["run_id"])
        if rm is not None:
            rm_stats = await reward_stats(policy, rm, [make_prompt(random.Random(70_000 + i)) for i in range(32)],
                                          cfg.max_tokens)
        before = await evaluate(policy, rm, eval_prompts, cfg.max_tokens, rm_stats)
        if algo == "ppo":
            await train_ppo(policy, rm, rec, cfg, rng, rm_stats, quiet)
        elif algo == "grpo":
            await train_grpo(policy, rm, rec, cfg, rng, rm_stats, quiet)
        else:
            await train_dpo(policy, rec, cfg, rng, quiet)
        after = await evaluate(policy, rm, eval_prompts, cfg.max_tokens, rm_stats)
        queue = await policy.queue_stats()
    finally:
        await client.close()
    elapsed = time.perf_counter() - t0

    key = "reward" if rm is not None else "task_score"
    summary = {
        "algo": algo, "quick": quick, "seed": seed, "elapsed_s": elapsed,
        "reward_key": key, "reward_before": before[key], "reward_after": after[key],
        "task_score_before": before["task_score"], "task_score_after": after["task_score"],
        "rm_score_before": before.get("rm_score"), "rm_score_after": after.get("rm_score"),
        "reward_model_accuracy": rm_acc, "improved": after[key] > before[key],
        "examples_before": before["examples"], "examples_after": after["examples"],
        "policy_requests": queue,
    }
    rec.log("summary", 0, **{k: v for k, v in summary.items() if isinstance(v, (int, float, bool, str))})
    plot = plot_curves(rec, os.path.join(out_dir, "curves.png"), algo)
    summary["plot"] = plot
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

    rows = []
    if rm is not None:
        rows.append(("reward (RM score, standardized)", f"{before['reward']:+.3f}", f"{after['reward']:+.3f}"))
        rows.append(("raw RM score", f"{before['rm_score']:.3f}", f"{after['rm_score']:.3f}"))
    rows.append(("task score (fraction of 'a')", f"{before['task_score']:.3f}", f"{after['task_score']:.3f}"))
    rows.append(("mean response length", f"{before['length']:.1f}", f"{after['length']:.1f}"))
    rows.append(("sample", repr(before["examples"][0]), repr(after["examples"][0])))
    if rm_acc is not None:
        rows.append(("reward model held-out accuracy", "", f"{rm_acc:.2f}"))
    print_table(rows, f"signal demo --algo {algo}: held-out prompts ({len(eval_prompts)} × 2 samples)")
    verdict = "higher" if summary["improved"] else "NOT higher"
    print(f"reward before {algo.upper()}: {summary['reward_before']:+.4f}   after: {summary['reward_after']:+.4f}   "
          f"({verdict}); task score {summary['task_score_before']:.3f} → {summary['task_score_after']:.3f}")
    print(f"finished in {elapsed:.1f} s; wrote {rec.path}, {plot or '(no plot: matplotlib missing)'}, "
          f"{os.path.join(out_dir, 'summary.json')}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signal demo", description=DESCRIPTION)
    parser.add_argument("--algo", choices=["ppo", "grpo", "dpo"], default="ppo",
                        help="the final stage: PPO with GAE (default), GRPO, or DPO (no reward model)")
    parser.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--remote", metavar="URL", default=None,
                        help="train on a `signal serve` server at URL (same results as the local engine)")
    parser.add_argument("--api-key", default=None, help="the server's API key (default $SIGNAL_API_KEY)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    summary = asyncio.run(run_demo(args.algo, args.out, args.quick, args.seed, args.quiet, args.remote, args.api_key))
    return 0 if (summary["improved"] or args.quick) else 1
