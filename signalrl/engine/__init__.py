"""The local engine behind the clients: models, runs, the request queue, checkpoints, sampling.

Nothing here knows about asyncio; every request returns a ``concurrent.futures.Future``.
"""
from .engine import Engine, RunNotFoundError, default_device
from .models import BUILTIN_MODELS, DEFAULT_BASE_MODEL, load_base_model
from .frozen_models import ReferenceCache
from .run import Run, RunConfig
from .tokenizer import build_byte_tokenizer, byte_tokenizer
from .types import (CheckpointResult, ForwardBackwardResult, ForwardResult, LogprobsResult, OptimStepResult,
                    SampledSequence, SampleResult, ScoreResult)

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_BASE_MODEL", "CheckpointResult", "Engine", "ForwardBackwardResult", "ForwardResult",
    "LogprobsResult", "OptimStepResult", "ReferenceCache", "Run", "RunConfig", "RunNotFoundError", "SampleResult",
    "SampledSequence", "ScoreResult", "build_byte_tokenizer", "byte_tokenizer", "default_device",
    "load_base_model",
]
