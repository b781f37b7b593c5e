"""Runs sharded across ranks with PyTorch FSDP2 under ``torchrun`` (see docs/distributed.md).

``start()`` on every rank: rank 0 gets a :class:`ShardedEngine` for the usual clients, the others follow it.
"""
from .comm import Comm, RankFailedError, init
from .engine import ShardedEngine, follow, start
from .policy import DistributedPolicy, ShardRoot
from .run import ShardedRun

__all__ = ["Comm", "DistributedPolicy", "RankFailedError", "ShardRoot", "ShardedEngine", "ShardedRun", "follow",
           "init", "start"]
