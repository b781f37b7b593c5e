"""The loss library: seven named losses, usable by name (training API) or directly (drop-in).

Interface (what the training engine codes against; details in ``docs/losses.md``)
------------------------------------------------------------------------------------
Registry (:mod:`signalrl.losses.registry`)::

    spec = get_loss("enhanced_ppo")        # LossSpec; unknown name -> ValueError listing the 7 names
    list_losses()                          # ['causal_lm', 'conservative_ppo', 'dpo', 'enhanced_ppo', ...]
    register_loss(spec)                    # add your own LossSpec

LossSpec (:mod:`signalrl.losses.base`)::

    spec.name, spec.batch (tuple of Field(key, shape pattern, kind, required, doc)), spec.defaults,
    spec.needs_value_head, spec.needs_reward_head, spec.uses_reference, spec.metric_names, spec.compute
    kw   = spec.resolve_kwargs(loss_kwargs)    # defaults applied; unknown key / bad value -> ValueError
                                               # (did-you-mean: clip_eps -> clip_epsilon)
    data = spec.validate_batch(batch)          # ValueError/TypeError naming the key, expected vs received
    res  = spec(policy, batch, **loss_kwargs)  # -> LossResult(loss, metrics, warnings)

``spec(...)`` re-validates kwargs and batch, so calling ``resolve_kwargs`` / ``validate_batch`` first
(before touching gradients) is optional but cheap. ``reference_model`` must be a model object or None
when calling (a name passes ``resolve_kwargs`` so an engine can validate early, then resolve it).
The call never runs ``backward``; it raises :class:`NonFiniteLossError` (a ``FloatingPointError``)
if the loss is NaN/inf, before the caller can accumulate any gradient.

LossResult: ``loss`` (0-d tensor with grad), ``metrics`` (dict of Python floats, one host sync per
call, always includes ``"loss"``), ``warnings`` (stability-monitor sentences: KL > 0.05, clip
fraction outside 0.1–0.3, explained variance < 0.5, any non-finite metric).

PolicyModel (:mod:`signalrl.losses.model`)::

    policy = PolicyModel(hf_model, reference_model=None, value_head=ValueHead(H), reward_head=None)
    policy.hidden_states(ids, mask) -> [B, T, H]      policy.lm_head() -> (weight [V, H], bias | None)
    policy.token_logprobs(ids, mask, with_entropy=False, temperature=1.0) -> [B, T] (+ entropy [B, T])
    policy.reference_logprobs(ids, mask) -> [B, T]   (no grad; reference model, else peft adapters off)
    policy.values(ids, mask) -> [B, T]               policy.sequence_rewards(ids, mask) -> [B]

Per-token arrays are ``[B, T]`` aligned with ``input_ids``: entry t is about token t (its log-prob
given the tokens before it, its reward, the value of the state it was chosen in); entry 0 is 0.

Drop-in forms (one pattern for all seven): the spec itself is the function, and each loss has an
``nn.Module`` class::

    signalrl.losses.dpo(model_or_policy, batch, beta=0.1, reference_model=ref)  -> LossResult
    DPOLoss(beta=0.1, reference_model=ref)(model_or_policy, batch)              -> LossResult
    EnhancedPPOLoss(value_head=ValueHead(H))(model, batch)  # the head is a sub-module of the loss

A bare Hugging Face model is wrapped in a :class:`PolicyModel` on the fly.
Note: the functions shadow the submodules of the same name as attributes of this package
(``signalrl.losses.dpo`` is the loss); import module contents with ``from signalrl.losses.dpo import X``.

Losses: ``enhanced_ppo``, ``conservative_ppo``, ``dpo``, ``grpo``, ``importance_sampling``,
``reward_modeling``, ``causal_lm``.
"""
from .base import Field, LossModule, LossResult, LossSpec, NonFiniteLossError, stability_warnings
from .model import FusedPathWarning, PolicyModel, RewardHead, ValueHead, as_policy
from .registry import get_loss, list_losses, register_loss

from .ppo import ConservativePPOLoss, EnhancedPPOLoss, conservative_ppo, enhanced_ppo  # noqa: E402  isort: skip
from .dpo import DPOLoss, dpo  # noqa: E402  isort: skip
from .grpo import GRPOLoss, grpo  # noqa: E402  isort: skip
from .importance_sampling import ImportanceSamplingLoss, importance_sampling  # noqa: E402  isort: skip
from .reward_modeling import RewardModelingLoss, reward_modeling  # noqa: E402  isort: skip
from .causal_lm import CausalLMLoss, causal_lm  # noqa: E402  isort: skip

__all__ = [
    "CausalLMLoss", "ConservativePPOLoss", "DPOLoss", "EnhancedPPOLoss", "Field", "FusedPathWarning", "GRPOLoss",
    "ImportanceSamplingLoss", "LossModule", "LossResult", "LossSpec", "NonFiniteLossError", "PolicyModel",
    "RewardHead", "RewardModelingLoss", "ValueHead", "as_policy", "causal_lm", "conservative_ppo", "dpo",
    "enhanced_ppo", "get_loss", "grpo", "importance_sampling", "list_losses", "register_loss",
    "reward_modeling", "stability_warnings",
]
