"""Triton kernels: the PPO policy loss from hidden states and the LM head in one pass over vocab tiles.

Family ``linear_ppo``. Forward: the tile kernel of :mod:`.linear_logprobs` streams the [BLOCK_N x BLOCK_V] logits
tiles once (online log-sum-exp + entropy + target logit, never an [N, V] buffer); once each row's LSE is known, the
per-token PPO epilogue (:func:`signalrl.kernels.ppo.ppo_token_fwd`: ratio, clipped/dual-clipped surrogate, KL
estimator, entropy bonus, the weighted token sum and the statistics, all in float32) runs on the [N] vectors and
also writes the per-token gradient coefficients g_lp = w·∂ℓ/∂logp and g_H = w·∂ℓ/∂H. The backward is then the
linear log-probs backward with those coefficients scaled by the incoming scalar gradient (read on the device: no
host sync): the logits tiles are recomputed and d hidden, d weight, d bias come out of the same chunked GEMMs.

    linear_ppo_fwd(hidden[N,H], weight[V,H], bias[V] | None, targets[N] int64, old_logprobs[N] f32,
                   advantages[N] f32, weights[N] f32, mask[N] f32 (0/1, counted tokens), ref_logprobs[N] f32 | empty,
                   temperature, ignore_index, clip_low, clip_high, dual_clip | None, kl_estimator, kl_coef,
                   entropy_coef, log_ratio_clamp | None = None)
        -> (loss[] f32, stats[9] f32 (signalrl.reference.stat_keys.PPO_STAT_KEYS order), logprobs[N] f32, entropy[N] f32,
            lse[N] f64, g_lp[N] f32, g_ent[N] f32 | empty (empty when entropy_coef == 0))
    linear_ppo_bwd(grad_loss[] f32, g_lp, g_ent | empty, hidden, weight, bias | None, targets, lse, entropy,
                   temperature, ignore_index, need_hidden, need_weight, need_bias)
        -> (grad_hidden | empty, grad_weight | empty, grad_bias | empty)

Memory: exactly that of linear_token_logprobs (see :mod:`.linear_logprobs`) plus a few [N] float32 vectors.
"""

from __future__ import annotations

import torch

from ._common import empty_f32, is_empty
from .linear_logprobs import _backward, linear_token_logprobs_fwd
from .ppo import PPO_STAT_KEYS, ppo_token_fwd

__all__ = ["linear_ppo_fwd", "linear_ppo_bwd", "PPO_STAT_KEYS"]


def linear_ppo_fwd(hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs,
                   temperature, ignore_index, clip_low, clip_high, dual_clip, kl_estimator, kl_coef, entropy_coef,
                   log_ratio_clamp=None):
    lp, ent, lse = linear_token_logprobs_fwd(hidden, weight, bias, targets, temperature, ignore_index, True)
    ref = None if is_empty(ref_logprobs) else ref_logprobs
    loss, g_lp, g_ent, stats = ppo_token_fwd(
        lp, old_logprobs, advantages, weights, mask, ref, ent,
        float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        kl_estimator, float(kl_coef), float(entropy_coef), log_ratio_clamp,
    )
    if not entropy_coef:
        g_ent = empty_f32(hidden.device)
    return loss, stats, lp, ent, lse, g_lp, g_ent


def linear_ppo_bwd(grad_loss, g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
                   need_hidden, need_weight, need_bias):
    scale = grad_loss.reshape(1).to(torch.float32)
    return _backward(g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
                     need_hidden, need_weight, need_bias, scale=scale)
