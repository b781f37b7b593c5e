"""``signal demo``: the three-stage RLHF pipeline, end to end, through the public client.

The synthetic task: a prompt is three letters and ``>`` (``"kqe>"``); a response is a short string over
``abcd``. The *task score* of a response is the number of ``a`` characters divided by max(length, 8): a
response of at least 8 characters, all ``a``, scores 1; the supervised data scores ≈ 0.25.

1. **SFT** (``causal_lm``): full fine-tuning of the built-in ``signal-tiny`` on prompt → random ``abcd``
   strings of 6–10 characters. Exported as a Hugging Face model directory (``sft_model/``).
2. **Reward model** (``reward_modeling``): the SFT model with a scalar reward head, trained on
   preference pairs whose chosen response has the higher task score.
3. **PPO with GAE** (``enhanced_ppo``): a LoRA policy on the SFT model (the reference is the same model
   with adapters disabled), rollouts from ``sample`` with their log-probs as ``old_log_probs``, the reward
   model's score (standardized) as the reward on the last token, and the run's value head for GAE.

Before and after, the policy is sampled on held-out prompts with a fixed seed and scored by the reward
model and by the task score. ``--algo grpo`` replaces stage 3 by GRPO (groups of samples per prompt);
``--algo dpo`` replaces stages 2–3 by DPO on pairs of SFT samples ranked by the task score.

Writes ``metrics.jsonl`` (one line per step and stage, plus a summary), ``curves.png`` (reward, KL and loss
curves), ``summary.json`` and the runs' own files under ``--out`` (default ``./demo_out``). With ``--remote URL``
the runs train on a ``signal serve`` server (their files stay there) and the same table is printed.
"""
from .run import main, run_demo
from .stages import Settings
from .task import make_prompt, preference_pair, sft_response, task_score

__all__ = ["Settings", "main", "make_prompt", "preference_pair", "run_demo", "sft_response", "task_score"]
