"""The op layer: validated public functions that dispatch to Triton, native C++ or the reference.

Every op has the signature of its :mod:`signalrl.reference` twin; ``backend_for`` says which backend
would run, ``use_backend`` / ``SIGNAL_BACKEND`` force one, ``check_mode`` / ``SIGNAL_CHECK=1``
compare every call with the float64 reference. Importing this package does not import triton or
build the native extension: both happen on the first call that needs them.
"""
from ..reference.aggregate import AGGREGATIONS, token_weights
from ..reference.kl import KL_ESTIMATORS
from ._backend import BACKENDS, available_backends, backend_for, forced_backend, use_backend
from ._check import SignalCheckError, check_enabled, check_mode
from .gae import gae
from .kl import kl_penalty
from .linear_ppo import linear_ppo_loss
from .linear_logprobs import linear_token_logprobs
from .logprobs import token_logprobs
from .ppo import clipped_surrogate, value_loss
from .stats import group_normalize, masked_mean, masked_whiten

#: the forward kernel op each public op runs: ``backend_for(KERNEL_OF["gae"], x)`` says which backend would run,
#: ``available_backends(KERNEL_OF["gae"], device)`` which can (``masked_*`` and ``group_normalize`` have no kernel)
KERNEL_OF: dict[str, str] = {
    "token_logprobs": "token_logprobs_fwd",
    "linear_token_logprobs": "linear_token_logprobs_fwd",
    "clipped_surrogate": "ppo_token_fwd",
    "value_loss": "value_loss_fwd",
    "kl_penalty": "kl_penalty_fwd",
    "gae": "gae_fwd",
    "linear_ppo_loss": "linear_ppo_fwd",
}

__all__ = [
    "AGGREGATIONS", "BACKENDS", "KERNEL_OF", "KL_ESTIMATORS", "SignalCheckError", "available_backends", "backend_for",
    "check_enabled", "check_mode", "clipped_surrogate", "forced_backend", "gae", "group_normalize", "kl_penalty",
    "linear_ppo_loss", "linear_token_logprobs", "masked_mean", "masked_whiten", "token_logprobs", "token_weights",
    "use_backend", "value_loss",
]
