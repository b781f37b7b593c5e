"""Per-token log-probabilities (and entropy) of target tokens from final hidden states and the LM head.

logits = hidden @ weight.T + bias, then exactly :func:`signalrl.reference.logprobs.token_logprobs` (same
temperature, ``ignore_index`` and non-finite semantics). The fused backends compute the same numbers without
materializing the ``[N, V]`` logits; this reference does materialize them (in float32, float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype
from .logprobs import token_logprobs


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """hidden ``[..., H]``, weight ``[V, H]``, optional bias ``[V]``, targets ``[...]``.

    logits = hidden @ weight.T + bias, computed in float32 (float64 for float64 inputs), then
    :func:`token_logprobs`. Memory: materializes ``[..., V]`` logits in float32.
    """
    dt = acc_dtype(hidden, weight)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    return token_logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
