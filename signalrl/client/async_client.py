"""The asynchronous client: ``AsyncSignalClient`` and its ``TrainingClient``, local or remote."""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from signalrl.engine import Engine
from signalrl.engine.types import (CheckpointResult, ForwardBackwardResult, ForwardResult, LogprobsResult,
                                   OptimStepResult, SampleResult, ScoreResult)

from .futures import APIFuture
from .transport import as_transport, make_transport


def _engine(engine: Engine | None, root_dir: str | None) -> Engine:
    if engine is not None:
        return engine
    return Engine(root_dir) if root_dir is not None else Engine.default()


class AsyncSignalClient:
    """Entry point of the training API: the embedded local engine, or a ``signal serve`` server over HTTP.

    ``AsyncSignalClient()`` uses the process-wide default engine (runs under ``$SIGNAL_HOME`` or ``./runs``);
    pass ``root_dir=`` for a private engine there, or ``engine=`` to share one. ``base_url=`` (or
    ``$SIGNAL_BASE_URL`` when neither ``engine`` nor ``root_dir`` is given) talks to a server instead, with
    ``api_key=`` (or ``$SIGNAL_API_KEY``); ``timeout``, ``poll_hold``, ``result_timeout`` and ``retry_deadline``
    (seconds) tune it (:mod:`signalrl.client.http`). Both return the same results and raise the same exceptions.
    """

    def __init__(self, *, engine: Engine | None = None, root_dir: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, **http_options: Any):
        self._transport = make_transport(engine, root_dir, base_url, api_key, loop_local=True, **http_options)
        self.engine = self._transport.engine  # None for a remote client

    async def create_run(self, base_model: str = "signal-tiny", **config: Any) -> dict[str, Any]:
        """Create a run and return its description (``run["run_id"]``, ``base_model``, ``step``, ...).

        Accepts every :class:`signalrl.engine.RunConfig` field: ``lora_r`` (0 = full fine-tuning),
        ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``learning_rate``, ``optimizer``
        (``adamw``, ``sgd``, ``adamw_8bit``), ``weight_decay``, ``max_grad_norm``, ``lr_scheduler``,
        ``warmup_steps``, ``total_steps``, ``value_head``, ``reward_head``, ``seed``, ``dtype``, ``device``,
        ``checkpoint_every``.
        """
        return await APIFuture(self._transport.create_run(base_model, config), "create_run")

    def get_training_client(self, run_id: str) -> "TrainingClient":
        """A client for one run (an unknown ``run_id`` fails on the first awaited request)."""
        return TrainingClient(self._transport, run_id)

    async def list_runs(self) -> list[dict[str, Any]]:
        return await asyncio.wrap_future(self._transport.list_runs())

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return await asyncio.wrap_future(self._transport.get_run(run_id))

    async def close(self) -> None:
        aclose = getattr(self._transport, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            self._transport.close()

    async def __aenter__(self) -> "AsyncSignalClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class TrainingClient:
    """Requests for one run. Each ``x_async(...)`` coroutine returns an :class:`APIFuture` as soon as the
    request is queued (``fut = await tc.forward_backward_async(...)``; later ``await fut``); ``x(...)``
    awaits both steps. Requests of a run execute in the order they were queued."""

    def __init__(self, engine: Engine | Any, run_id: str):
        self._transport = as_transport(engine)
        self.engine = self._transport.engine  # None for a remote client
        self.run_id = run_id
        self._session = self._transport.session(run_id)

    async def _submit(self, op: str, *args: Any, _wait: bool = False, **kwargs: Any) -> APIFuture:
        fut, accepted = self._session.submit(op, args, kwargs, wait=_wait)
        if accepted is not None:  # remote: return once the server holds the request (its errors come from fut)
            await asyncio.wait([asyncio.wrap_future(accepted)])
        return fut

    async def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """The awaited form: remote, the submission also waits (a bounded hold) for the result, and only the result
        is awaited (one wake-up of this loop)."""
        return await self._session.submit(op, args, kwargs, wait=True)[0]

    # --- futures (queued now, awaited later)
    async def forward_backward_async(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                                     ) -> APIFuture[ForwardBackwardResult]:
        return await self._submit("forward_backward", batch_data, loss_fn, loss_kwargs)

    async def forward_async(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                            ) -> APIFuture[ForwardResult]:
        return await self._submit("forward", batch_data, loss_fn, loss_kwargs)

    async def optim_step_async(self, learning_rate: float | None = None) -> APIFuture[OptimStepResult]:
        return await self._submit("optim_step", learning_rate)

    async def sample_async(self, prompts: Sequence[Any], max_tokens: int = 32, temperature: float = 1.0,
                           num_samples: int = 1, seed: int | None = None) -> APIFuture[SampleResult]:
        return await self._submit("sample", prompts, max_tokens, temperature, num_samples, seed)

    async def score_async(self, batch_data: Any) -> APIFuture[ScoreResult]:
        return await self._submit("score", batch_data)

    async def compute_logprobs_async(self, batch_data: Any) -> APIFuture[LogprobsResult]:
        return await self._submit("compute_logprobs", batch_data)

    async def save_state_async(self, name: str) -> APIFuture[CheckpointResult]:
        return await self._submit("save_state", name)

    async def load_state_async(self, name: str) -> APIFuture[CheckpointResult]:
        return await self._submit("load_state", name)

    async def export_model_async(self, path: str, overwrite: bool = False) -> APIFuture[str]:
        return await self._submit("export_model", path, overwrite=overwrite)

    # --- awaited results
    async def forward_backward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                               ) -> ForwardBackwardResult:
        """Compute ``loss_fn`` on ``batch_data`` and add its gradients to the run's accumulated ones."""
        return await self._call("forward_backward", batch_data, loss_fn, loss_kwargs)

    async def forward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None) -> ForwardResult:
        """The loss and metrics without gradients (eval mode)."""
        return await self._call("forward", batch_data, loss_fn, loss_kwargs)

    async def optim_step(self, learning_rate: float | None = None) -> OptimStepResult:
        """Clip, step the optimizer on the accumulated gradients, clear them. ``learning_rate`` overrides
        the scheduled rate for this step only."""
        return await self._call("optim_step", learning_rate)

    async def sample(self, prompts: Sequence[Any], max_tokens: int = 32, temperature: float = 1.0,
                     num_samples: int = 1, seed: int | None = None) -> SampleResult:
        """``num_samples`` completions per prompt with per-token log-probs (for ``old_log_probs``)."""
        return await self._call("sample", prompts, max_tokens, temperature, num_samples, seed)

    async def score(self, batch_data: Any) -> ScoreResult:
        """Reward-head scores of sequences (reward-model runs)."""
        return await self._call("score", batch_data)

    async def compute_logprobs(self, batch_data: Any) -> LogprobsResult:
        return await self._call("compute_logprobs", batch_data)

    async def save_state(self, name: str) -> CheckpointResult:
        return await self._call("save_state", name)

    async def load_state(self, name: str) -> CheckpointResult:
        """Restore a checkpoint of this run by name, or any compatible checkpoint by path."""
        return await self._call("load_state", name)

    async def export_model(self, path: str, overwrite: bool = False) -> str:
        """Write a Hugging Face model directory (LoRA merged) + tokenizer; usable as a ``base_model``. On a server,
        ``path`` is a path on the server, relative to the API key's workspace (docs/server.md)."""
        return await self._call("export_model", path, overwrite=overwrite)

    async def queue_stats(self) -> dict[str, Any]:
        """Submitted / completed / failed / pending requests and mean queue-wait and execution times."""
        return await asyncio.wrap_future(self._transport.queue_stats(self.run_id))

    async def get_info(self) -> dict[str, Any]:
        return await asyncio.wrap_future(self._transport.get_run(self.run_id))

    async def get_metrics(self, since: int = 0) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` records, from line ``since`` on."""
        return await asyncio.wrap_future(self._transport.get_metrics(self.run_id, since))

    async def list_checkpoints(self) -> list[str]:
        """The names of the run's checkpoints."""
        return await asyncio.wrap_future(self._transport.list_checkpoints(self.run_id))
