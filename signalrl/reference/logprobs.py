"""Per-token log-probabilities (and entropy) of target tokens.

With z = logits / T (temperature T), lse = logsumexp(z) over the vocabulary:

    logprob_i = z[i, t_i] - lse_i
    entropy_i = -sum_j p_ij log p_ij,  p_i = softmax(z_i)

Positions whose target equals ``ignore_index`` give 0 (log-prob and entropy) and receive zero
gradient, whatever their logits hold. Outputs are float32 (float64 for float64 inputs) whatever the input dtype.
"""
from __future__ import annotations

import torch

from ._dtype import acc_dtype


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """logits ``[..., V]``, targets ``[...]`` (int64) → log-probs ``[...]`` (+ entropy ``[...]``).

    Memory: materializes the full ``[..., V]`` float32 log-softmax (that is what the fused ops avoid).
    """
    valid = targets != ignore_index
    # ignored rows select 0 logits: whatever they hold (NaN, ±inf), outputs and gradients are those of zeros
    z = torch.where(valid.unsqueeze(-1), logits.to(acc_dtype(logits)) / temperature, 0.0)
    logp_all = torch.log_softmax(z, dim=-1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = logp.new_zeros(())
    logp = torch.where(valid, logp, zero)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    plogp = torch.where(p > 0, p * logp_all, torch.zeros_like(p))
    entropy = torch.where(valid, -plogp.sum(-1), zero)
    return logp, entropy


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
