"""Per-token log-probabilities (and entropy) of target tokens.

With z = logits / T (temperature T), lse = logsumexp(z) over the vocabulary:

    logprob_i = z[i, t_i] - lse_i
    entropy_i = -sum_j p_ij log p_ij,  p_i = softmax(z_i)

Positions whose target equals ``ignore_index`` give 0 (log-prob and entropy) and receive zero
gradient, whatever their logits hold. Outputs are float32 (float64 for float64 inputs) whatever the input dtype.

Non-finite logits follow IEEE arithmetic as ``torch.log_softmax`` does: a −inf logit has p = 0 (its log-prob is
−inf, and it adds nothing to the entropy: 0·log 0 = 0); a counted row with a NaN or +inf logit, or with only −inf
logits, gives NaN log-prob and NaN entropy. A target outside [0, V) that is not ``ignore_index`` gives a NaN
log-prob (never an out-of-bounds read; the public op refuses such targets on CPU before this runs).
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
    in_range = (targets >= 0) & (targets < logits.shape[-1])
    safe_targets = torch.where(valid & in_range, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = logp.new_zeros(())
    logp = torch.where(valid, torch.where(in_range, logp, float("nan")), zero)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # 0·log 0 = 0 (−inf logits), with a zero gradient (no 0·inf in backward); a NaN p stays NaN
    plogp = p * torch.where(p == 0, torch.zeros_like(logp_all), logp_all)
    entropy = torch.where(valid, -plogp.sum(-1), zero)
    return logp, entropy

