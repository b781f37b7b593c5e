"""The scalar settings of each kernel family, one frozen object per family, and the one place where their names
are mapped from the public keywords.

A kernel op's schema (:mod:`signalrl.ops._library`) lists its tensors, then the fields of its family's params
object in declaration order, by the same names: :meth:`Params.schema` writes that part of the schema and
:meth:`Params.flat` the matching arguments. The Triton launchers (``signalrl/kernels/<family>.py``) and the C++
kernels (``csrc/cpu/<family>.cpp``) take the same arguments under the same names — the dispatcher needs them flat.

Where a public keyword and a kernel argument differ, the mapping is:

==========================  =============================  ==================================
loss keyword (losses/)      op keyword (ops/)              params field
==========================  =============================  ==================================
``temperature``             ``temperature``                ``LogprobParams.temperature``
—                           ``ignore_index``               ``LogprobParams.ignore_index``
``clip_epsilon``            ``clip_low``                   ``PPOParams.clip_low``
``clip_epsilon_high``       ``clip_high``                  ``PPOParams.clip_high``
``dual_clip``               ``dual_clip``                  ``PPOParams.dual_clip``
``kl_estimator``            ``kl_estimator``, ``estimator``  ``PPOParams.kl_estimator``, ``KLParams.estimator``
``beta``                    ``kl_coef``                    ``PPOParams.kl_coef``
``entropy_coef``            ``entropy_coef``               ``PPOParams.entropy_coef``
``log_ratio_clamp``         ``log_ratio_clamp``            ``PPOParams.log_ratio_clamp``
``value_clip_epsilon``      ``clip``                       ``ValueParams.clip``
``gamma``, ``gae_lambda``   ``gamma``, ``lam``             ``GAEParams.gamma``, ``GAEParams.lam``
``loss_aggregation``        ``aggregation``                per-token weights (not a kernel setting)
==========================  =============================  ==================================

The names differ only where the public ones came first (the loss keywords follow TRL / verl; the op keywords follow
the math); everything below the op keyword has one name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

# a field's annotation (a string under postponed evaluation) → its schema type
_SCHEMA_TYPES = {"float": "float", "float | None": "float?", "int": "int", "str": "str", "bool": "bool"}


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of the per-family settings: ``schema()`` and ``flat()`` keep a schema and its call in step."""

    family: ClassVar[str] = ""

    @classmethod
    def schema(cls) -> str:
        """The schema arguments of the fields, e.g. ``"float clip_low, float? dual_clip"``."""
        return ", ".join(f"{_SCHEMA_TYPES[str(f.type)]} {f.name}" for f in dataclasses.fields(cls))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the field names in declaration order, as a plain class attribute: flat() runs on every op call (and under
        # torch.compile), where dataclasses.fields() would cost more than the rest of the call's Python
        cls._names = tuple(n for n, a in cls.__dict__.get("__annotations__", {}).items()
                           if not str(a).startswith(("ClassVar", "typing.ClassVar")))

    def flat(self) -> tuple[Any, ...]:
        """The field values in schema order."""
        return tuple(getattr(self, name) for name in self._names)

    @classmethod
    def size(cls) -> int:
        """The number of fields (of schema arguments)."""
        return len(cls._names)


@dataclasses.dataclass(frozen=True)
class LogprobParams(Params):
    """Families ``logprobs``, ``linear_logprobs`` (and the log-prob half of ``linear_ppo``).

    ``temperature`` T > 0 divides the logits; targets equal to ``ignore_index`` give 0 and no gradient."""

    family: ClassVar[str] = "logprobs"
    temperature: float = 1.0
    ignore_index: int = -100


@dataclasses.dataclass(frozen=True)
class KLParams(Params):
    """Family ``kl``: the estimator of KL(π ‖ π_ref) from d = logprobs − ref_logprobs (k1, k2, k3, abs)."""

    family: ClassVar[str] = "kl"
    estimator: str = "k3"


@dataclasses.dataclass(frozen=True)
class PPOParams(Params):
    """Family ``ppo`` (the per-token epilogue; also the PPO half of ``linear_ppo``).

    The ratio is clipped to [1 − clip_low, 1 + clip_high]; ``dual_clip`` c > 1 bounds negative-advantage losses by
    −A·c; ``kl_coef``·KL(``kl_estimator``) is added and ``entropy_coef``·H subtracted per token; ``log_ratio_clamp``
    c clamps log ρ to [−c, c] before the exp (None: no clamp)."""

    family: ClassVar[str] = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_estimator: str = "k3"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    log_ratio_clamp: float | None = None


@dataclasses.dataclass(frozen=True)
class ValueParams(Params):
    """Family ``ppo``'s value loss: the prediction is clipped to old_values ± ``clip`` (None: no clip)."""

    family: ClassVar[str] = "ppo"
    clip: float | None = None


@dataclasses.dataclass(frozen=True)
class GAEParams(Params):
    """Family ``gae``: discount ``gamma`` and GAE ``lam``, both in [0, 1]."""

    family: ClassVar[str] = "gae"
    gamma: float = 0.99
    lam: float = 0.95


__all__ = ["GAEParams", "KLParams", "LogprobParams", "PPOParams", "Params", "ValueParams"]
