"""Results returned by the engine (and, unchanged, by the clients).

Every result is a dataclass with attribute access, ``result["key"]`` access and ``to_dict()``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Result:
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ForwardBackwardResult(_Result):
    """``loss`` and ``metrics`` (Python floats), the stability ``warnings``, and ``timing`` in seconds
    (``queue_wait``, ``compute``, ``total``). ``step`` is the optimizer step the gradients belong to."""
    loss: float
    metrics: dict[str, float]
    warnings: list[str]
    timing: dict[str, float]
    loss_fn: str
    step: int
    num_examples: int
    num_tokens: int


@dataclass
class ForwardResult(ForwardBackwardResult):
    """Same fields as :class:`ForwardBackwardResult`; no gradients were computed."""


@dataclass
class OptimStepResult(_Result):
    """``grad_norm`` is the total 2-norm of the accumulated gradients before clipping; ``learning_rate``
    the rate this step used; ``step`` the number of optimizer steps taken so far (after this one);
    ``checkpoint`` the path of the checkpoint ``checkpoint_every`` saved after this step, else None."""
    grad_norm: float
    learning_rate: float
    step: int
    clipped: bool
    timing: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class SampledSequence(_Result):
    """One completion: ``tokens`` (the response, including the end-of-sequence token if one was
    produced), ``text`` (decoded, special tokens removed), ``logprobs`` (one per token of ``tokens``:
    log-probability of that token under the distribution it was drawn from), ``finish_reason``
    (``"stop"`` or ``"length"``) and the ``prompt_tokens`` it continues."""
    tokens: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: list[int]


@dataclass
class SampleResult(_Result):
    """``sequences[i][j]``: sample ``j`` of prompt ``i``."""
    sequences: list[list[SampledSequence]]
    timing: dict[str, float] = field(default_factory=dict)

    def flat(self) -> list[SampledSequence]:
        return [s for group in self.sequences for s in group]


@dataclass
class CheckpointResult(_Result):
    name: str
    path: str
    step: int


@dataclass
class ScoreResult(_Result):
    """Scalar reward-head outputs (reward-model runs), one per sequence."""
    rewards: list[float]


@dataclass
class LogprobsResult(_Result):
    """Per-token log-probs ``[B][T]`` aligned with the batch's ``input_ids`` (entry 0 is 0)."""
    logprobs: list[list[float]]
