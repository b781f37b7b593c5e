"""The documented training API.

```python
client = AsyncSignalClient()                      # local engine, embedded default
# client = AsyncSignalClient(base_url="http://gpu-box:8000", api_key="sk-signal-...")   # a `signal serve` server
run = await client.create_run(base_model="signal-tiny", lora_r=32, lora_alpha=64, learning_rate=1e-5)
tc = client.get_training_client(run["run_id"])
result = await tc.forward_backward(batch_data=batch, loss_fn="enhanced_ppo", loss_kwargs={...})
await tc.optim_step()
```
"""
from signalrl.engine import RunNotFoundError
from signalrl.engine.types import (CheckpointResult, ForwardBackwardResult, ForwardResult, LogprobsResult,
                                   OptimStepResult, SampledSequence, SampleResult, ScoreResult)

from .async_client import AsyncSignalClient, TrainingClient
from .errors import (SignalAPIError, SignalAuthError, SignalConflictError, SignalConnectionError,
                     SignalServerError)
from .futures import APIFuture, FutureGroup
from .sync_client import SignalClient, SyncTrainingClient

__all__ = [
    "APIFuture", "AsyncSignalClient", "CheckpointResult", "ForwardBackwardResult", "ForwardResult", "FutureGroup",
    "LogprobsResult", "OptimStepResult", "RunNotFoundError", "SampleResult", "SampledSequence", "ScoreResult",
    "SignalAPIError", "SignalAuthError", "SignalClient", "SignalConflictError", "SignalConnectionError",
    "SignalServerError", "SyncTrainingClient", "TrainingClient",
]
