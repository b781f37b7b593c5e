"""A run sharded across ranks with FSDP2: :class:`ShardedRun`, the same requests as
:class:`signalrl.engine.run.Run`, executed in lockstep by every rank on the same (global) arguments.

- Sharding: ``fully_shard`` on every decoder layer, then on the :class:`~signalrl.distributed.policy.ShardRoot`
  (embeddings, final norm, LM head — tied or not). LoRA runs shard the frozen base and the adapters together
  (FSDP2 handles frozen and trainable parameters in one group). On CUDA a float32 run computes with bfloat16
  parameters and reduces gradients in float32 (``MixedPrecisionPolicy``); on CPU everything stays float32.
  Value and reward heads (``H + 1`` numbers each) are replicated, their gradients summed over ranks.
- Data parallel, exact: see :mod:`signalrl.distributed.policy`. Parameter gradients are *summed* over ranks
  (FSDP2's gradient divide factor 1), grad_norm is reduced over all shards.
- Failure safety: ``forward_backward`` backpropagates into fresh gradients (the accumulated ones set aside),
  checks the loss and the global gradient norm for non-finite values (an all-reduce: a NaN on any rank is seen
  by every rank) and only then adds the accumulated gradients back; a failure restores them on every rank.
- Checkpoints: the full (gathered) tensors in the run's own format (:mod:`signalrl.engine.checkpoint`), written
  by rank 0 — loadable by a run at any world size, sharded or not.
- Export: the full model gathered to rank 0 (FSDP2's full state dict), rebuilt there as a plain model and written
  exactly as a one-process run writes it (LoRA merged, tokenizer, atomic); every rank returns the same path.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch
import torch.distributed as dist

from signalrl.engine import batching, checkpoint, checkpoint_load
from signalrl.engine.rng import own_rng
from signalrl.engine.run import Run
from signalrl.engine.types import CheckpointResult, ForwardBackwardResult

from .comm import Comm, RankFailedError, run_everywhere
from .policy import DistributedPolicy, ShardRoot


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (plain or peft)."""
    from signalrl.losses.model import PolicyModel

    layers = getattr(PolicyModel(model).backbone(), "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (no backbone .layers)")
    return list(layers)


class _RootLM:
    """The causal LM as sampling sees it, every call routed through the FSDP2 root."""

    def __init__(self, root: ShardRoot):
        self._root = root

    def get_base_model(self):
        m = self._root.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def __call__(self, *args, **kwargs):
        return self._root("lm", *args, **kwargs)


class ShardedRun(Run):
    """``ShardedRun(run_id, config, comm=..., split=None, **Run's arguments)``: built on every rank.

    ``split``: how a global batch's rows are divided (a list of per-rank counts, or a callable ``B -> counts``);
    default contiguous chunks as equal as possible. Ranks other than 0 keep their metrics under
    ``<run_dir>/.ranks/<rank>/``; rank 0 owns ``<run_dir>`` (metrics, checkpoints)."""

    def __init__(self, run_id: str, config, *, comm: Comm, run_dir: str, split: Sequence[int] | Any = None, **kw):
        self.comm = comm
        self.split = split
        self._root: ShardRoot | None = None
        own_dir = run_dir if comm.is_leader else os.path.join(run_dir, ".ranks", str(comm.rank))
        super().__init__(run_id, config, run_dir=own_dir, **kw)
        self.run_dir = run_dir
        self._fingerprint = self._compute_fingerprint()  # frozen weights never change: one gather, at creation

    # ------------------------------------------------------------------ sharding
    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if self.device.type == "cuda" and self.dtype == torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = ShardRoot(model)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.comm.mesh, mp_policy=mp)
        fully_shard(root, mesh=self.comm.mesh, mp_policy=mp)
        for m in root.modules():
            if isinstance(m, FSDPModule):
                # the loss is the global one on every rank: its gradient is the *sum* of the ranks' parts
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self._root = root
        return model

    def _policy(self, reference_model=None):
        self._root.heads = self.heads
        return DistributedPolicy(self._root, self.comm, reference_model=reference_model, split=self.split)

    def _sampling_model(self):
        return _RootLM(self._root)

    # ------------------------------------------------------------------ gradients
    def _head_grads(self) -> list[torch.Tensor]:
        return [p.grad for h in self.heads.values() for p in h.parameters() if p.grad is not None]

    def _global_sq_norm(self, grads: list[torch.Tensor]) -> float:
        """Σ g² over every gradient of the run, all shards of every rank (replicated tensors counted once)."""
        sharded = [_local(g) for g in grads if _is_dtensor(g)]
        replicated = [g for g in grads if not _is_dtensor(g)]
        sq = torch.zeros((), dtype=torch.float64, device=self.comm.device)
        if sharded:
            sq = sq + torch.stack([n.double() ** 2 for n in torch._foreach_norm(sharded, 2)]).sum()
        dist.all_reduce(sq)
        if replicated:
            sq = sq + torch.stack([n.double() ** 2 for n in torch._foreach_norm(replicated, 2)]).sum()
        return float(sq.item())

    def _grad_norm(self, grads: list[torch.Tensor]) -> float:
        return math.sqrt(self._global_sq_norm(grads))

    def _scale_grads(self, grads: list[torch.Tensor], factor: float) -> None:
        for g in grads:
            g.mul_(factor)

    # ------------------------------------------------------------------ requests
    @own_rng
    def forward_backward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                         ) -> ForwardBackwardResult:
        t0 = time.perf_counter()

        def prepare():
            spec, kwargs, batch = self._prepare(batch_data, loss_fn, loss_kwargs)
            created = self._ensure_heads(spec)
            try:
                return spec, self._reference(spec, kwargs), batch, created
            except BaseException:
                for kind in created:
                    self._drop_head(kind)
                raise

        out, exc = None, None
        try:
            out = prepare()
        except Exception as e:  # noqa: BLE001 - shared with the other ranks below
            exc = e
        try:
            self.comm.raise_if_any_failed(exc, "forward_backward")
        except BaseException:
            for kind in (out[3] if out is not None else []):
                self._drop_head(kind)
            raise
        spec, kwargs, batch, created = out
        named = self.trainable_parameters()
        params = [p for _, p in named]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        ok = False
        try:
            if not self.model.training:
                self.model.train()
            with torch.enable_grad():
                res = spec(self._policy(kwargs.get("reference_model")), batch, **kwargs)
                loss_value = float(res.loss.detach().item())  # the global loss: the same on every rank
                res.loss.backward()
            self.comm.sum_(self._head_grads())
            grads = [p.grad for p in params if p.grad is not None]
            sq = self._global_sq_norm(grads) if grads else 0.0
            if not math.isfinite(sq):
                bad = [n for (n, p) in named if p.grad is not None and not torch.isfinite(_local(p.grad)).all()]
                raise FloatingPointError(f"{loss_fn}: non-finite gradients (on some rank; here: {bad[:5]}); "
                                         "no gradient was accumulated")
            ok = True
        finally:
            if not ok:
                for p, g in zip(params, saved):
                    p.grad = g
                for kind in created:
                    self._drop_head(kind)
        with torch.no_grad():
            for p, g in zip(params, saved):
                if g is not None:
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
        self._grad_norms = None
        self.pending_grads += 1
        return self._loss_result(ForwardBackwardResult, "forward_backward", loss_fn, res, batch, t0, loss_value)

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def _compute_fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                h.update(f"{n}{tuple(p.shape)}{_full(p).double().sum().item():.10e}".encode())
        return h.hexdigest()[:16]

    def frozen_fingerprint(self) -> str:
        return getattr(self, "_fingerprint", None) or self._compute_fingerprint()

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every trainable tensor and the optimizer state, gathered (collective: every rank calls it)."""
        tensors = {n: _full(p.detach()).cpu() for n, p in self.trainable_parameters()}
        sd = self.optimizer.state_dict()
        state = {pid: {k: (_full(v).cpu() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                 for pid, st in sd["state"].items()}
        return tensors, {"state": state, "param_groups": sd["param_groups"]}

    @own_rng
    def save_state(self, name: str) -> CheckpointResult:
        path = run_everywhere(self.comm, lambda: self.checkpoint_path(name), "save_state")
        tensors, optimizer = self._full_state()
        state = {"step": self.step, "heads": list(self.heads), "run_id": self.run_id,
                 "config": asdict(self.config), "lora": self.is_lora, "frozen_fingerprint": self.frozen_fingerprint()}

        def write():
            if self.comm.is_leader:
                checkpoint.write_checkpoint(path, tensors=tensors, optimizer=optimizer,
                                            scheduler=self.scheduler.state_dict(),
                                            rng=checkpoint.capture_rng(self.sampling_generator), state=state)

        run_everywhere(self.comm, write, "save_state")
        self._log("save_state", {"name": name, "path": path})
        return CheckpointResult(name=name, path=path, step=self.step)

    @own_rng
    def load_state(self, name_or_path) -> CheckpointResult:
        """As :meth:`Run.load_state`, on every rank (each reads the checkpoint: a shared filesystem on several
        nodes); all ranks load, or none does."""
        from torch.distributed.tensor import distribute_tensor

        def plan():
            path = checkpoint.resolve(os.path.join(self.run_dir, "checkpoints"), name_or_path)
            return checkpoint_load.plan_load(self, path)

        plan = run_everywhere(self.comm, plan, "load_state")
        for n, p in self.trainable_parameters():
            if _is_dtensor(p):
                plan.tensors[n] = distribute_tensor(plan.tensors[n].to(self.device), p.device_mesh, p.placements,
                                                    src_data_rank=None)
        checkpoint_load.apply_load(self, plan)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not _is_dtensor(p):
                    continue
                st = self.optimizer.state.get(p, {})
                for k, v in list(st.items()):
                    if isinstance(v, torch.Tensor) and not _is_dtensor(v) and tuple(v.shape) == tuple(p.shape) \
                            and v.dim() > 0:
                        st[k] = distribute_tensor(v.to(self.device), p.device_mesh, p.placements,
                                                  src_data_rank=None)
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_grads = 0
        self._grad_norms = None
        self.step = plan.step
        self._log("load_state", {"path": plan.path})
        return CheckpointResult(name=os.path.basename(os.path.normpath(plan.path)), path=plan.path, step=self.step)

    def export_model(self, path: str, overwrite: bool = False) -> str:
        """As :meth:`Run.export_model`: a standalone Hugging Face directory (LoRA merged) plus the tokenizer,
        written atomically, the same refusal rules (:mod:`signalrl.engine.export`).

        Collective: every rank takes part in gathering the full model (FSDP2's full state dict, offloaded to
        rank 0's CPU: the other ranks keep nothing); rank 0 rebuilds a plain (unsharded) copy of the model from
        it and writes exactly what a one-process run writes. Every rank returns the same path, or every rank
        raises (rank 0's error; :class:`RankFailedError` on the others). A target that would be refused is
        refused before the gather."""
        from signalrl.engine import export

        def precheck() -> None:
            # the refusal (non-empty target, foreign files) before the gather; argument errors are export_dir's
            if self.comm.is_leader and isinstance(path, str) and path and "\0" not in path \
                    and isinstance(overwrite, bool):
                export._check_target(os.path.abspath(path), overwrite)

        run_everywhere(self.comm, precheck, "export_model")
        state = self._full_model_state()

        def write() -> str | None:
            if not self.comm.is_leader:
                return None
            return export.export_dir(path, lambda tmp: self._write_export(tmp, state), overwrite=overwrite)

        out = run_everywhere(self.comm, write, "export_model")
        state.clear()
        out = self.comm.broadcast_value(out)
        self._log("export_model", {"path": out})
        return out

    @torch.no_grad()
    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's full state dict (every parameter and persistent buffer, unsharded) on rank 0's CPU; an
        empty dict on the other ranks (collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @torch.no_grad()
    def _write_export(self, tmp: str, state: dict[str, torch.Tensor]) -> None:
        """Rank 0: a plain copy of the model built on the meta device, given the gathered tensors (no copy),
        LoRA merged, saved as :meth:`Run.export_model` saves it."""
        from torch.distributed.fsdp import FSDPModule

        base = self._base()
        cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses in place
        with torch.device("meta"):
            model = cls(copy.deepcopy(base.config))
        if self.is_lora:
            model = self._apply_lora(model)
        model.load_state_dict(state, strict=True, assign=True)
        # non-persistent buffers (rotary frequencies) are in no state dict: the live model's (never sharded)
        live = dict(self.model.named_buffers())
        for name, buf in list(model.named_buffers()):
            if buf.is_meta:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = _full(live[name]).detach().cpu().clone()
        model.tie_weights()  # the state dict holds tied tensors as separate copies
        if self.is_lora:
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)

    def full_trainable_grads(self) -> dict[str, torch.Tensor]:
        """Every accumulated gradient gathered (collective; for tests and tools)."""
        return {n: _full(p.grad).clone() for n, p in self.trainable_parameters() if p.grad is not None}

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor gathered (collective; for tests and tools)."""
        return {n: _full(p.detach()).clone() for n, p in self.trainable_parameters()}


__all__ = ["ShardedRun", "RankFailedError", "decoder_layers", "batching"]
