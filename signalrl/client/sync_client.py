"""The synchronous client: every request returns an :class:`APIFuture`; call ``.result()``."""
from __future__ import annotations

from typing import Any, Sequence

from signalrl.engine import Engine

from .futures import APIFuture
from .transport import as_transport, make_transport


class SignalClient:
    """``SignalClient()``: like :class:`AsyncSignalClient` (same arguments: a local engine, or ``base_url`` /
    ``api_key`` / ``$SIGNAL_BASE_URL`` for a server), but blocking-free calls that return futures.

    ``run = client.create_run(...).result()``; ``tc = client.get_training_client(run["run_id"])``;
    ``tc.forward_backward(batch, "causal_lm").result()``. ``list_runs``/``get_run`` return values.
    """

    def __init__(self, *, engine: Engine | None = None, root_dir: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, **http_options: Any):
        self._transport = make_transport(engine, root_dir, base_url, api_key, **http_options)
        self.engine = self._transport.engine  # None for a remote client

    def create_run(self, base_model: str = "signal-tiny", **config: Any) -> APIFuture[dict]:
        return APIFuture(self._transport.create_run(base_model, config), "create_run")

    def get_training_client(self, run_id: str) -> "SyncTrainingClient":
        return SyncTrainingClient(self._transport, run_id)

    def list_runs(self) -> list[dict[str, Any]]:
        return self._transport.list_runs().result()

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._transport.get_run(run_id).result()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "SignalClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SyncTrainingClient:
    """Same requests as :class:`TrainingClient`; each returns an :class:`APIFuture` at once (remote: before the
    server has acknowledged it; requests keep their order)."""

    def __init__(self, engine: Engine | Any, run_id: str):
        self._transport = as_transport(engine)
        self.engine = self._transport.engine
        self.run_id = run_id
        self._session = self._transport.session(run_id)

    def _queue(self, op: str, *args: Any, **kwargs: Any) -> APIFuture:
        return self._session.submit(op, args, kwargs)[0]

    def forward_backward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None) -> APIFuture:
        return self._queue("forward_backward", batch_data, loss_fn, loss_kwargs)

    def forward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None) -> APIFuture:
        return self._queue("forward", batch_data, loss_fn, loss_kwargs)

    def optim_step(self, learning_rate: float | None = None) -> APIFuture:
        return self._queue("optim_step", learning_rate)

    def sample(self, prompts: Sequence[Any], max_tokens: int = 32, temperature: float = 1.0, num_samples: int = 1,
               seed: int | None = None) -> APIFuture:
        return self._queue("sample", prompts, max_tokens, temperature, num_samples, seed)

    def score(self, batch_data: Any) -> APIFuture:
        return self._queue("score", batch_data)

    def compute_logprobs(self, batch_data: Any) -> APIFuture:
        return self._queue("compute_logprobs", batch_data)

    def save_state(self, name: str) -> APIFuture:
        return self._queue("save_state", name)

    def load_state(self, name: str) -> APIFuture:
        return self._queue("load_state", name)

    def export_model(self, path: str, overwrite: bool = False) -> APIFuture:
        return self._queue("export_model", path, overwrite=overwrite)

    def queue_stats(self) -> dict[str, Any]:
        return self._transport.queue_stats(self.run_id).result()

    def get_info(self) -> dict[str, Any]:
        return self._transport.get_run(self.run_id).result()

    def get_metrics(self, since: int = 0) -> list[dict[str, Any]]:
        return self._transport.get_metrics(self.run_id, since).result()

    def list_checkpoints(self) -> list[str]:
        return self._transport.list_checkpoints(self.run_id).result()
