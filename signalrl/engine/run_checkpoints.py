"""A run's checkpoints and exports (:class:`Checkpoints`, a base of :class:`signalrl.engine.run.Run`): atomic,
all-or-nothing, no pickle — the format is :mod:`signalrl.engine.checkpoint`."""
from __future__ import annotations

import os
from dataclasses import asdict

import torch

from . import checkpoint, checkpoint_load
from .rng import own_rng
from .types import CheckpointResult


class Checkpoints:
    @torch.no_grad()
    def frozen_fingerprint(self) -> str:
        """A short digest of the frozen weights (what a LoRA checkpoint does not store)."""
        import hashlib

        h = hashlib.sha256()
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                h.update(f"{n}{tuple(p.shape)}{p.double().sum().item():.10e}".encode())
        return h.hexdigest()[:16]

    def checkpoint_path(self, name: str) -> str:
        """``<run_dir>/checkpoints/<name>`` (a symlink to the checkpoint's current version directory)."""
        return os.path.join(self.run_dir, "checkpoints", checkpoint.validate_name(name))

    @own_rng
    def save_state(self, name: str) -> CheckpointResult:
        """Save the run as checkpoint ``name`` (≤ 200 bytes, no ``/``, NUL or leading ``.``), atomically replacing
        one of that name: whenever the process dies, the name is the previous or the new checkpoint. The format
        and the guarantee: :mod:`signalrl.engine.checkpoint`."""
        path = self.checkpoint_path(name)
        state = {"step": self.step, "heads": list(self.heads), "run_id": self.run_id,
                 "config": asdict(self.config), "lora": self.is_lora, "frozen_fingerprint": self.frozen_fingerprint()}
        checkpoint.write_checkpoint(
            path, tensors=dict(self.trainable_parameters()), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), rng=checkpoint.capture_rng(self.sampling_generator), state=state)
        self._log("save_state", {"name": name, "path": path})
        return CheckpointResult(name=name, path=path, step=self.step)

    @own_rng
    def load_state(self, name_or_path: str | os.PathLike) -> CheckpointResult:
        """Restore a checkpoint, all or nothing.

        ``name_or_path``: a string without a path separator is a checkpoint name of *this* run
        (``<run_dir>/checkpoints/<name>``, never a directory of the current directory); one with a separator
        (``./dir``, ``/abs/dir``) or an ``os.PathLike`` is a path to any compatible checkpoint (same
        ``base_model``, LoRA settings and seed). Every file is read and checked (shapes, dtypes, finite values,
        heads, base fingerprint, optimizer, scheduler and RNG states) before the run changes; a bad checkpoint
        raises one ``ValueError`` naming the file, and the run is then exactly as before. Accumulated
        gradients are dropped by a successful load."""
        path = checkpoint.resolve(os.path.join(self.run_dir, "checkpoints"), name_or_path)
        plan = checkpoint_load.plan_load(self, path)
        checkpoint_load.apply_load(self, plan)
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_grads = 0
        self._grad_norms = None
        self.step = plan.step
        self._log("load_state", {"path": path})
        return CheckpointResult(name=os.path.basename(os.path.normpath(path)), path=path, step=self.step)

    def export_model(self, path: str, overwrite: bool = False) -> str:
        """Write a standalone Hugging Face model directory (LoRA merged) plus the tokenizer, loadable with
        ``from_pretrained`` and usable as another run's ``base_model`` or as a ``reference_model``.

        ``path`` must be missing or an empty directory; ``overwrite=True`` replaces only a previous Signal
        export (marked by ``signal_export.json``) that holds nothing else. Never deletes anything else."""
        import copy

        from .export import export_dir

        def write(tmp: str) -> None:
            model = copy.deepcopy(self.model).merge_and_unload() if self.is_lora else self.model
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        path = export_dir(path, write, overwrite=overwrite)
        self._log("export_model", {"path": path})
        return path
