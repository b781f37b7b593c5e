"""Triton kernels, one module per kernel family (see docs/backends.md).

Families: ``logprobs`` (token log-probs + entropy from logits), ``linear_logprobs`` (the same from hidden states and
the LM head, never materializing [N, V] logits), ``linear_ppo`` (the PPO policy loss from hidden states in one pass
over vocab tiles), ``ppo`` (PPO epilogue, value loss), ``kl`` (KL estimators) and ``gae``. The op layer registers
each launcher as the CUDA implementation of its kernel op (:mod:`signalrl.ops._library`) and imports the family on
the first call, so importing this package (or :mod:`.params`, the kernels' settings) does not import triton.
"""
