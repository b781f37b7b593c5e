"""The asynchronous client: ``AsyncSignalClient`` and its ``TrainingClient``."""
from __future__ import annotations

from typing import Any, Sequence

from signalrl.engine import Engine
from signalrl.engine.types import (CheckpointResult, ForwardBackwardResult, ForwardResult, LogprobsResult,
                                   OptimStepResult, SampleResult, ScoreResult)

from .futures import APIFuture


def _engine(engine: Engine | None, root_dir: str | None) -> Engine:
    if engine is not None:
        return engine
    return Engine(root_dir) if root_dir is not None else Engine.default()


class AsyncSignalClient:
    """Entry point of the training API, backed by the embedded local engine.

    ``AsyncSignalClient()`` uses the process-wide default engine (runs under ``$SIGNAL_HOME`` or
    ``./runs``); pass ``root_dir=`` for a private engine there, or ``engine=`` to share one.
    """

    def __init__(self, *, engine: Engine | None = None, root_dir: str | None = None):
        self.engine = _engine(engine, root_dir)

    async def create_run(self, base_model: str = "signal-tiny", **config: Any) -> dict[str, Any]:
        """Create a run and return its description (``run["run_id"]``, ``base_model``, ``step``, ...).

        Accepts every :class:`signalrl.engine.RunConfig` field: ``lora_r`` (0 = full fine-tuning),
        ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``learning_rate``, ``optimizer``
        (``adamw``, ``sgd``, ``adamw_8bit``), ``weight_decay``, ``max_grad_norm``, ``lr_scheduler``,
        ``warmup_steps``, ``total_steps``, ``value_head``, ``reward_head``, ``seed``, ``dtype``, ``device``.
        """
        return await APIFuture(self.engine.create_run(base_model, **config), "create_run")

    def get_training_client(self, run_id: str) -> "TrainingClient":
        """A client for one run (an unknown ``run_id`` fails on the first awaited request)."""
        return TrainingClient(self.engine, run_id)

    async def list_runs(self) -> list[dict[str, Any]]:
        return self.engine.list_runs()

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return self.engine.get_run(run_id)

    async def close(self) -> None:
        if self.engine is not Engine._default:
            self.engine.close()

    async def __aenter__(self) -> "AsyncSignalClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class TrainingClient:
    """Requests for one run. Each ``x_async(...)`` coroutine returns an :class:`APIFuture` as soon as the
    request is queued (``fut = await tc.forward_backward_async(...)``; later ``await fut``); ``x(...)``
    awaits both steps. Requests of a run execute in the order they were queued."""

    def __init__(self, engine: Engine, run_id: str):
        self.engine = engine
        self.run_id = run_id

    def _queue(self, op: str, *args: Any, **kwargs: Any) -> APIFuture:
        return APIFuture(self.engine.request(self.run_id, op, *args, **kwargs), op)

    # --- futures (queued now, awaited later)
    async def forward_backward_async(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                                     ) -> APIFuture[ForwardBackwardResult]:
        return self._queue("forward_backward", batch_data, loss_fn, loss_kwargs)

    async def forward_async(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                            ) -> APIFuture[ForwardResult]:
        return self._queue("forward", batch_data, loss_fn, loss_kwargs)

    async def optim_step_async(self, learning_rate: float | None = None) -> APIFuture[OptimStepResult]:
        return self._queue("optim_step", learning_rate)

    async def sample_async(self, prompts: Sequence[Any], max_tokens: int = 32, temperature: float = 1.0,
                           num_samples: int = 1, seed: int | None = None) -> APIFuture[SampleResult]:
        return self._queue("sample", prompts, max_tokens, temperature, num_samples, seed)

    async def score_async(self, batch_data: Any) -> APIFuture[ScoreResult]:
        return self._queue("score", batch_data)

    async def compute_logprobs_async(self, batch_data: Any) -> APIFuture[LogprobsResult]:
        return self._queue("compute_logprobs", batch_data)

    async def save_state_async(self, name: str) -> APIFuture[CheckpointResult]:
        return self._queue("save_state", name)

    async def load_state_async(self, name: str) -> APIFuture[CheckpointResult]:
        return self._queue("load_state", name)

    async def export_model_async(self, path: str, overwrite: bool = False) -> APIFuture[str]:
        return self._queue("export_model", path, overwrite=overwrite)

    # --- awaited results
    async def forward_backward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                               ) -> ForwardBackwardResult:
        """Compute ``loss_fn`` on ``batch_data`` and add its gradients to the run's accumulated ones."""
        return await (await self.forward_backward_async(batch_data, loss_fn, loss_kwargs))

    async def forward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None) -> ForwardResult:
        """The loss and metrics without gradients (eval mode)."""
        return await (await self.forward_async(batch_data, loss_fn, loss_kwargs))

    async def optim_step(self, learning_rate: float | None = None) -> OptimStepResult:
        """Clip, step the optimizer on the accumulated gradients, clear them. ``learning_rate`` overrides
        the scheduled rate for this step only."""
        return await (await self.optim_step_async(learning_rate))

    async def sample(self, prompts: Sequence[Any], max_tokens: int = 32, temperature: float = 1.0,
                     num_samples: int = 1, seed: int | None = None) -> SampleResult:
        """``num_samples`` completions per prompt with per-token log-probs (for ``old_log_probs``)."""
        return await (await self.sample_async(prompts, max_tokens, temperature, num_samples, seed))

    async def score(self, batch_data: Any) -> ScoreResult:
        """Reward-head scores of sequences (reward-model runs)."""
        return await (await self.score_async(batch_data))

    async def compute_logprobs(self, batch_data: Any) -> LogprobsResult:
        return await (await self.compute_logprobs_async(batch_data))

    async def save_state(self, name: str) -> CheckpointResult:
        return await (await self.save_state_async(name))

    async def load_state(self, name: str) -> CheckpointResult:
        """Restore a checkpoint of this run by name, or any compatible checkpoint by path."""
        return await (await self.load_state_async(name))

    async def export_model(self, path: str, overwrite: bool = False) -> str:
        """Write a Hugging Face model directory (LoRA merged) + tokenizer; usable as a ``base_model``."""
        return await (await self.export_model_async(path, overwrite))

    async def queue_stats(self) -> dict[str, Any]:
        """Submitted / completed / failed / pending requests and mean queue-wait and execution times."""
        return self.engine.queue_stats(self.run_id)

    async def get_info(self) -> dict[str, Any]:
        return self.engine.get_run(self.run_id)
