"""Ground truth in plain PyTorch.

Every op in :mod:`signalrl.ops` has a function of the same name and signature here. These are
written to be read and trusted, not to be fast: they materialize what they need, compute in
float32 (float64 when given float64) and use only documented PyTorch autograd.
This package imports nothing else from :mod:`signalrl`.
"""
from .aggregate import AGGREGATIONS, aggregate, token_weights
from .gae import gae
from .kl import KL_ESTIMATORS, kl_penalty
from .linear_ppo import linear_ppo_loss
from .linear_logprobs import linear_token_logprobs
from .logprobs import token_logprobs
from .ppo import clipped_surrogate, value_loss
from .stats import group_normalize, masked_mean, masked_var, masked_whiten

__all__ = [
    "AGGREGATIONS", "KL_ESTIMATORS", "aggregate", "clipped_surrogate", "gae", "group_normalize",
    "kl_penalty", "linear_ppo_loss", "linear_token_logprobs", "masked_mean", "masked_var",
    "masked_whiten", "token_logprobs", "token_weights", "value_loss",
]
