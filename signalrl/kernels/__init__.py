"""Triton kernels, one module per kernel family (see docs/backends.md).

Families: ``logprobs`` (token log-probs + entropy from logits), ``linear_logprobs`` (the same from hidden states and
the LM head, never materializing [N, V] logits), ``linear_ppo`` (the PPO policy loss from hidden states in one pass
over vocab tiles), ``ppo`` (PPO epilogue, value loss), ``kl`` (KL estimators) and ``gae``. The op layer imports a family on first use
(``signalrl.ops._backend.get_impl``), so importing this package does not import triton.
"""
