"""``signal serve --nproc-per-node N``: the server's engine sharded across N ranks per node, under ``torchrun``.

:func:`add_arguments` adds the launch options to ``signal serve``'s parser. With more than one rank (or any
multi-node option), :func:`relaunch` replaces the process with ``torchrun <launch options> -m signalrl.cli serve
<the same arguments> --sharded``; in every rank, ``--sharded`` makes :func:`sharded_engine` start the process group
(:func:`signalrl.distributed.start`). Rank 0 gets the :class:`~signalrl.distributed.engine.ShardedEngine` and builds
the HTTP service over it (clients are unchanged); the other ranks execute rank 0's commands until it closes, then
exit. Nothing below this module knows how the job was launched.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

# torchrun's rendezvous options passed through as given (flag, dest)
_RDZV = (("--nnodes", "nnodes"), ("--node-rank", "node_rank"), ("--rdzv-backend", "rdzv_backend"),
         ("--rdzv-endpoint", "rdzv_endpoint"), ("--rdzv-id", "rdzv_id"), ("--master-addr", "master_addr"),
         ("--master-port", "master_port"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sharded engine (FSDP2 under torchrun; see docs/distributed.md)")
    g.add_argument("--nproc-per-node", type=int, default=1,
                   help="ranks on this node (GPUs, or CPU processes); > 1 shards every run across them (default 1)")
    g.add_argument("--nnodes", default=None, help="torchrun: number of nodes (N or MIN:MAX); run the same command "
                   "on every node")
    g.add_argument("--node-rank", type=int, default=None, help="torchrun: this node's rank (static rendezvous)")
    g.add_argument("--rdzv-backend", default=None, help="torchrun: rendezvous backend (e.g. c10d)")
    g.add_argument("--rdzv-endpoint", default=None, help="torchrun: rendezvous HOST:PORT")
    g.add_argument("--rdzv-id", default=None, help="torchrun: job id shared by the nodes")
    g.add_argument("--master-addr", default=None, help="torchrun: rank 0's node address (static rendezvous)")
    g.add_argument("--master-port", type=int, default=None, help="torchrun: rank 0's port (static rendezvous)")
    g.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds any collective may wait before a dead or hung rank fails the request "
                   "(default $SIGNAL_DIST_TIMEOUT or 300)")
    g.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)  # set by the torchrun relaunch


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node: expected an int >= 1, got {args.nproc_per_node}")
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        parser.error(f"--dist-timeout: expected seconds > 0, got {args.dist_timeout}")


def wants_torchrun(args: argparse.Namespace) -> bool:
    """Not yet under torchrun, and asked for more than one rank (or for a multi-node rendezvous)."""
    if args.sharded:
        return False
    return args.nproc_per_node > 1 or any(getattr(args, dest) is not None for _, dest in _RDZV)


def torchrun_command(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run <launch options> -m signalrl.cli serve <argv> --sharded``. One node with
    no rendezvous option given: ``--standalone`` (a free local port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node)]
    given = [(flag, getattr(args, dest)) for flag, dest in _RDZV if getattr(args, dest) is not None]
    if not given:
        cmd.append("--standalone")
    for flag, value in given:
        cmd += [flag, str(value)]
    return [*cmd, "-m", "signalrl.cli", "serve", *argv, "--sharded"]


def relaunch(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Replace this process by torchrun (same pid: signals sent to ``signal serve`` reach torchrun, which passes
    them to every rank)."""
    cmd = torchrun_command(args, argv)
    print("signal serve: sharded across ranks: " + " ".join(cmd[1:]), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def sharded_engine(args: argparse.Namespace, runs_dir: str) -> Any:
    """In every rank of a ``--sharded`` server: rank 0 gets its :class:`ShardedEngine`; other ranks serve it here
    until it closes and get ``None`` (they then exit)."""
    from .comm import RankFailedError
    from .engine import start

    try:
        return start(runs_dir, timeout_s=args.dist_timeout)
    except RankFailedError as exc:  # rank 0 went away (or hung) without saying stop
        raise SystemExit(f"signal serve: {exc}") from None


def finish() -> None:
    """Leave the process group (after the engine is closed, or on a follower once rank 0 said stop)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
