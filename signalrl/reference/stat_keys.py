"""The names and order of the PPO statistics, written once.

The reference builds its stats dicts from these tuples; the kernels write their ``stats`` vectors in this order
(Triton: :mod:`signalrl.kernels.ppo`; C++: ``csrc/cpu/ppo.cpp``, which indexes them by position since it cannot
import this: keep the two in step), and the op layer zips them back into dicts.
"""
from __future__ import annotations

# clipped_surrogate: masked means over counted tokens (ρ after the log-ratio clamp)
SURROGATE_STAT_KEYS = ("clip_fraction", "dual_clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
# the fused PPO epilogue and linear_ppo_loss: the surrogate's stats, then the terms of the loss
PPO_STAT_KEYS = SURROGATE_STAT_KEYS + ("pg_loss", "entropy", "kl")
# value_loss
VALUE_STAT_KEYS = ("value_clip_fraction", "explained_variance", "value_mean", "return_mean")
