"""Process groups and the few collectives the sharded run needs.

One :class:`Comm` per process: the default process group (gloo on CPU, NCCL on CUDA), an explicit 1-D device
mesh over all ranks (FSDP2's data-parallel dimension), the collective timeout, and how a global batch's rows are
split across ranks. Every wait is bounded by ``timeout_s``: a rank that dies or hangs makes the others raise
instead of waiting forever.

Nothing is pickled between ranks: values travel as the remote API's wire format (:mod:`signalrl.wire`: JSON, and
tensors as safetensors), as bytes in a ``uint8`` tensor preceded by its length (:meth:`Comm.broadcast_value`,
:meth:`Comm.all_gather_value`).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class RankFailedError(RuntimeError):
    """A request failed on another rank (or a collective timed out); every rank raises it, none changed state."""


@dataclass
class Comm:
    rank: int
    world_size: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    timeout_s: float
    local_rank: int = 0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ splits
    def row_counts(self, n_rows: int, split: Sequence[int] | None = None) -> list[int]:
        """Rows of a global batch per rank: ``split`` if given (it must sum to ``n_rows``), else contiguous chunks
        as equal as possible (the first ``n_rows % world`` ranks take one more)."""
        if split is not None:
            counts = [int(c) for c in split]
            if len(counts) != self.world_size or sum(counts) != n_rows or min(counts) < 0:
                raise ValueError(f"split: expected {self.world_size} row counts >= 0 summing to {n_rows}, "
                                 f"got {counts}")
            return counts
        q, r = divmod(n_rows, self.world_size)
        return [q + (i < r) for i in range(self.world_size)]

    # ------------------------------------------------------------------ collectives
    def any_true(self, flag: bool) -> bool:
        """Global OR of a per-rank flag."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` of rank ``src`` on every rank (two collectives: the length, then the bytes)."""
        n = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=src)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if data else \
                torch.empty(0, dtype=torch.uint8, device=self.device)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        if buf.numel():
            dist.broadcast(buf, src=src)
        return bytes(buf.cpu().numpy().tobytes()) if self.rank != src else data

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (lengths first, then the bytes padded to the longest)."""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        lens = [torch.empty_like(n) for _ in range(self.world_size)]
        dist.all_gather(lens, n)
        sizes = [int(x.item()) for x in lens]
        width = max(max(sizes), 1)
        buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        return [p[:k].cpu().numpy().tobytes() for p, k in zip(parts, sizes)]

    def broadcast_value(self, value: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` (JSON values, tensors, result dataclasses: :func:`signalrl.wire.to_wire`) on
        every rank. (To fail before any collective on a value that cannot travel, :func:`encode` it first and
        use :meth:`broadcast_encoded`.)"""
        return decode(self.broadcast_bytes(encode(value) if self.rank == src else None, src))

    def broadcast_encoded(self, body: bytes | None, src: int = 0) -> Any:
        """As :meth:`broadcast_value`, for a value :func:`encode`-d beforehand on rank ``src``."""
        return decode(self.broadcast_bytes(body, src))

    def all_gather_value(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (as :meth:`broadcast_value` can carry), in rank order."""
        return [decode(b) for b in self.all_gather_bytes(encode(value))]

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In-place global sum of plain (replicated-layout) tensors, flattened into one buffer."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
                          for t in tensors])
        dist.all_reduce(flat)
        i = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[i:i + n].view_as(t))
            i += n

    def raise_if_any_failed(self, exc: BaseException | None, what: str) -> None:
        """Every rank calls this at the same point; if one rank's ``exc`` is set, every rank raises (the rank's own
        exception where it failed, else :class:`RankFailedError` naming the failed ranks)."""
        if not self.any_true(exc is not None):
            return
        msgs = self.all_gather_value(None if exc is None else f"{type(exc).__name__}: {exc}")
        if exc is not None:
            raise exc
        bad = {i: m for i, m in enumerate(msgs) if m is not None}
        raise RankFailedError(f"{what} failed on rank(s) {sorted(bad)}: {next(iter(bad.values()))}")


def encode(value: Any) -> bytes:
    """``value`` as bytes in the remote API's format (``TypeError`` naming the part that cannot travel)."""
    from signalrl import wire

    body, ctype = wire.encode_body(value)
    return (b"J" if ctype == wire.JSON else b"S") + body


def decode(data: bytes) -> Any:
    """The inverse of :func:`encode` (JSON and safetensors only: nothing is unpickled)."""
    from signalrl import wire

    return wire.decode_body(data[1:], wire.JSON if data[:1] == b"J" else wire.SAFETENSORS)


def gather_rows(comm: Comm, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """All ranks' row blocks concatenated in rank order (``[sum(counts), ...]``), differentiable: every rank computes
    the same global loss from the gathered tensor, so the gradient of its own rows is its slice of the (identical)
    upstream gradient — the backward needs no communication. A rank with 0 rows passes a dummy row (dropped)."""
    return _GatherRows.apply(local, comm, tuple(counts))


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, comm, counts):
        r = comm.rank
        ctx.lo, ctx.n, ctx.local_shape = sum(counts[:r]), counts[r], local.shape
        width = max(max(counts), 1)
        buf = local.new_zeros((width, *local.shape[1:]))
        if counts[r]:
            buf[:counts[r]] = local
        parts = [torch.empty_like(buf) for _ in counts]
        dist.all_gather(parts, buf.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        if ctx.n == 0:
            return grad.new_zeros(ctx.local_shape), None, None
        return grad[ctx.lo:ctx.lo + ctx.n].contiguous(), None, None


def init(timeout_s: float | None = None, backend: str | None = None) -> Comm:
    """Initialize (or reuse) the default process group from torchrun's environment and build the device mesh.

    ``backend``: default NCCL when CUDA is available, else gloo. ``timeout_s``: every collective's bound
    (default ``$SIGNAL_DIST_TIMEOUT`` or 300 s)."""
    from torch.distributed.device_mesh import init_device_mesh

    if timeout_s is None:
        timeout_s = float(os.environ.get("SIGNAL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a number > 0, got {timeout_s!r}")
    cuda = torch.cuda.is_available() and backend != "gloo"
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return Comm(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, mesh=mesh,
                timeout_s=timeout_s, local_rank=local_rank)


def is_comm_error(exc: BaseException) -> bool:
    """A failed or timed-out collective (a rank died or hangs): the group is out of step, unlike a request error."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in msg for w in (
        "gloo", "nccl", "timed out", "timeout", "connection reset", "connection closed", "broken pipe"))


def run_everywhere(comm: Comm, fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on this rank, then a status exchange: all ranks return, or all raise. A communication error is
    raised at once (there is no status to exchange with a group that is out of step)."""
    exc: BaseException | None = None
    out = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if is_comm_error(e):
            raise
        exc = e
    comm.raise_if_any_failed(exc, what)
    return out
