"""What ``create_run`` accepts: :class:`RunConfig`, its validation, and the learning-rate schedule it names."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .models import DEFAULT_BASE_MODEL, resolve_dtype

OPTIMIZERS = ("adamw", "sgd", "adamw_8bit")
SCHEDULES = ("constant", "linear", "cosine")
HEADS = ("value", "reward")


@dataclass
class RunConfig:
    """Everything ``create_run`` accepts. ``lora_r=0`` means full fine-tuning.

    ``lora_target_modules=None`` targets every linear layer of the decoder (peft's ``"all-linear"``).
    ``lr_scheduler``: ``constant``, or ``linear``/``cosine`` decay to 0 at ``total_steps`` after
    ``warmup_steps`` of linear warm-up. ``value_head``/``reward_head``: ``None`` creates the head the first
    time a loss needs it, ``True`` at creation, ``False`` never (a loss that needs it then fails).
    """
    base_model: str = DEFAULT_BASE_MODEL
    lora_r: int = 32
    lora_alpha: float = 64
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str | None = None
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    value_head: bool | None = None
    reward_head: bool | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    name: str | None = None
    tensorboard: bool = False

    def validate(self) -> None:
        def need(cond: bool, arg: str, expected: str, got: Any) -> None:
            if not cond:
                raise ValueError(f"{arg}: expected {expected}, got {got!r}")

        need(isinstance(self.base_model, str) and bool(self.base_model), "base_model", "a non-empty string",
             self.base_model)
        need(isinstance(self.lora_r, int) and self.lora_r >= 0, "lora_r", "an int >= 0 (0 = full fine-tuning)",
             self.lora_r)
        need(self.lora_alpha > 0, "lora_alpha", "> 0", self.lora_alpha)
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)", self.lora_dropout)
        need(isinstance(self.learning_rate, (int, float)) and self.learning_rate >= 0, "learning_rate", ">= 0",
             self.learning_rate)
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", self.optimizer)
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "None or > 0",
             self.max_grad_norm)
        need(self.lr_scheduler in SCHEDULES, "lr_scheduler", f"one of {SCHEDULES}", self.lr_scheduler)
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        need(self.lr_scheduler == "constant" or (self.total_steps or 0) > 0, "total_steps",
             f"> 0 with lr_scheduler={self.lr_scheduler!r}", self.total_steps)
        resolve_dtype(self.dtype)


def _lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    warm, total, kind = cfg.warmup_steps, cfg.total_steps, cfg.lr_scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
