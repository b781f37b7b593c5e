"""A run: one trainable model (optionally LoRA), its heads, optimizer, schedule, tokenizer and metrics.

All methods run on the device worker thread (see :mod:`signalrl.engine.worker`); a run is never
touched by two threads at once.

Failure safety: ``forward_backward`` validates the loss name, its kwargs and the batch before any
compute, computes gradients with ``torch.autograd.grad`` into fresh tensors, checks them for
non-finite values, and only then adds them to ``.grad``. A call that raises therefore leaves the
accumulated gradients, the weights and the optimizer exactly as they were (a head created for that
call is removed again).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch

from . import batching, checkpoint, limits
from .config import HEADS, RunConfig, _lr_lambda
from .frozen_models import ReferenceCache
from .metrics import MetricsWriter
from .models import BUILTIN_MODELS, load_base_model, resolve_dtype
from .rng import own_rng
from .run_checkpoints import Checkpoints
from .run_sampling import Sampling
from .types import ForwardBackwardResult, ForwardResult, OptimStepResult


def _float32_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms as float32 (one fused multi-tensor kernel per dtype; float64 gradients are reduced in
    float64 and then rounded, as ``_foreach_norm`` will not narrow them)."""
    if all(g.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in grads):
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    return [n.float() for n in torch._foreach_norm(grads, 2)]


def _losses():
    import signalrl.losses as losses
    from signalrl.losses import model as loss_model

    return losses, loss_model


class Run(Sampling, Checkpoints):
    """One run (module docstring); sampling and scoring: :class:`Sampling`, checkpoints and export:
    :class:`Checkpoints`."""

    def __init__(self, run_id: str, config: RunConfig, *, run_dir: str, reference_cache: ReferenceCache,
                 device: str, max_request_bytes: int | None = None):
        config.validate()
        self.max_request_bytes = limits.resolve_max_request_bytes(max_request_bytes)
        # The run's own stream of the global torch RNG (dropout, LoRA dropout included): seeded by config.seed,
        # swapped in around every request, so a run is reproducible whatever else the process does.
        self._rng_state = torch.Generator().manual_seed(config.seed + 23).get_state()
        self._cuda_rng_state: torch.Tensor | None = None
        self.run_id = run_id
        self.config = config
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype)
        self.reference_cache = reference_cache
        self.created_at = time.time()
        self.step = 0
        self.pending_grads = 0  # forward_backward calls accumulated since the last optim_step
        self._grad_norms: list[torch.Tensor] | None = None  # per-tensor float32 norms of the accumulated grads
        self._trainable: list[tuple[str, torch.nn.Parameter]] | None = None  # cache; reset when heads change
        os.makedirs(run_dir, exist_ok=True)
        checkpoint.clean_leftovers(os.path.join(run_dir, "checkpoints"))  # what an interrupted save left

        base, self.tokenizer = load_base_model(config.base_model, dtype=self.dtype, device=self.device,
                                               seed=config.seed)
        self.is_lora = config.lora_r > 0
        if self.is_lora:
            base = self._apply_lora(base)
        self.model = self._wrap_model(base)
        self.model.train()
        self.hidden_size = int(self._base().config.hidden_size)
        self.heads: dict[str, torch.nn.Module] = {}
        self.optimizer = self._make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.sampling_generator = torch.Generator(device=self.device)
        self.sampling_generator.manual_seed(config.seed + 17)
        for head in HEADS:
            if getattr(config, f"{head}_head"):
                self._create_head(head)
        self.metrics = MetricsWriter(os.path.join(run_dir, "metrics.jsonl"), tensorboard=config.tensorboard)

    # ------------------------------------------------------------------ construction
    def _base(self) -> torch.nn.Module:
        """The causal LM under the peft wrapper (if any)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if callable(get) else self.model

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Hook for subclasses, called once before the optimizer is built (the sharded run applies FSDP2 here,
        :mod:`signalrl.distributed`); the identity here."""
        return model

    def _apply_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        import peft

        cfg = self.config
        targets = cfg.lora_target_modules if cfg.lora_target_modules is not None else "all-linear"
        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=targets, bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # peft calling deprecated transformers APIs
            torch.manual_seed(cfg.seed + 1)
            try:
                return peft.get_peft_model(model, lora)
            except ValueError as exc:
                raise ValueError(f"lora_target_modules: {exc}") from exc

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ValueError("optimizer: 'adamw_8bit' needs the bitsandbytes package, which is not installed "
                             "(pip install bitsandbytes), or use 'adamw'") from exc
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)

    def _create_head(self, kind: str) -> torch.nn.Module:
        _, loss_model = _losses()
        cls = loss_model.ValueHead if kind == "value" else loss_model.RewardHead
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + (101 if kind == "value" else 202))
            head = cls(self.hidden_size)
        head.to(self.device)
        head.train()
        self.heads[kind] = head
        self._trainable = None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.add_param_group({"params": list(head.parameters()), "lr": lr})
        # LambdaLR keeps one base lr and one lambda per group.
        self.scheduler.base_lrs.append(self.scheduler.base_lrs[0])
        self.scheduler.lr_lambdas.append(self.scheduler.lr_lambdas[0])
        return head

    def _drop_head(self, kind: str) -> None:
        head = self.heads.pop(kind)
        self._trainable = None
        ids = {id(p) for p in head.parameters()}
        for i, group in enumerate(self.optimizer.param_groups):
            if any(id(p) in ids for p in group["params"]):
                del self.optimizer.param_groups[i]
                del self.scheduler.base_lrs[i]
                del self.scheduler.lr_lambdas[i]
                break
        for p in head.parameters():
            self.optimizer.state.pop(p, None)

    def _ensure_heads(self, spec) -> list[str]:
        created = []
        for kind, needed in (("value", spec.needs_value_head), ("reward", spec.needs_reward_head)):
            if needed and kind not in self.heads:
                if getattr(self.config, f"{kind}_head") is False:
                    raise ValueError(f"loss_fn {spec.name!r} needs a {kind} head, but this run was created with "
                                     f"{kind}_head=False")
                self._create_head(kind)
                created.append(kind)
        return created

    # ------------------------------------------------------------------ helpers
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of every trainable weight: the model's, then each head's (``heads.<kind>.*``)."""
        if self._trainable is None:
            out = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            for kind, head in self.heads.items():
                out += [(f"heads.{kind}.{n}", p) for n, p in head.named_parameters()]
            self._trainable = out
        return list(self._trainable)

    def _reference(self, spec, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not getattr(spec, "uses_reference", False) or "reference_model" not in kwargs:
            return kwargs
        ref = kwargs["reference_model"]
        if isinstance(ref, str):
            ref = self.reference_cache.get(ref, dtype=self.dtype, device=self.device,
                                           seed=self.config.seed if ref in BUILTIN_MODELS else 0)
        elif ref is None and not self.is_lora:
            # Full fine-tuning: the reference is a frozen copy of the base model (same name, same seed).
            ref = self.reference_cache.get(self.config.base_model, dtype=self.dtype, device=self.device,
                                           seed=self.config.seed)
        return {**kwargs, "reference_model": ref}

    def _policy(self, reference_model=None):
        _, loss_model = _losses()
        return loss_model.PolicyModel(self.model, reference_model=reference_model,
                                      value_head=self.heads.get("value"), reward_head=self.heads.get("reward"))

    def _prepare(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None):
        losses, _ = _losses()
        spec = losses.get_loss(loss_fn)
        if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
            raise TypeError(f"loss_kwargs: expected a dict or None, got {type(loss_kwargs).__name__}")
        kwargs = spec.resolve_kwargs(dict(loss_kwargs or {}))
        batch = batching.prepare_batch(batch_data, self.tokenizer, loss_fn=loss_fn, device=self.device,
                                       accepted_keys={f.key for f in spec.batch})
        spec.validate_batch(batch)
        limits.check_request(self._base().config, self._element_size(), self.max_request_bytes,
                             limits.batch_sequences(batch))
        return spec, kwargs, batch

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _log(self, op: str, record: dict[str, Any]) -> None:
        self.metrics.write({"run_id": self.run_id, "op": op, "step": self.step, **record})

    # ------------------------------------------------------------------ requests
    @own_rng
    def forward_backward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None
                         ) -> ForwardBackwardResult:
        t0 = time.perf_counter()
        spec, kwargs, batch = self._prepare(batch_data, loss_fn, loss_kwargs)
        created = self._ensure_heads(spec)
        try:
            kwargs = self._reference(spec, kwargs)
            if not self.model.training:  # train() walks every module: skip it when nothing changed the mode
                self.model.train()
            named = self.trainable_parameters()
            params = [p for _, p in named]
            with torch.enable_grad():
                res = spec(self._policy(kwargs.get("reference_model")), batch, **kwargs)
                grads = torch.autograd.grad(res.loss, params, allow_unused=True)
            present = [(n, g) for (n, _), g in zip(named, grads) if g is not None]
            # One fused multi-tensor norm and one host sync for the loss and every gradient: a NaN/inf anywhere
            # makes its tensor's norm non-finite. The float32 norms are kept for optim_step's clipping.
            norms = _float32_norms([g for _, g in present]) if present else []
            values = torch.stack([res.loss.detach().float().reshape(()), *norms]).tolist()
            loss_value, finite = values[0], [math.isfinite(v) for v in values[1:]]
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{loss_fn}: the loss is not finite ({loss_value}); "
                                         "no gradient was accumulated")
            bad = [n for (n, _), ok in zip(present, finite) if not ok]
            if bad:
                raise FloatingPointError(f"{loss_fn}: non-finite gradients in {bad[:5]}"
                                         f"{' and more' if len(bad) > 5 else ''}; no gradient was accumulated")
        except BaseException:
            for kind in created:
                self._drop_head(kind)
            raise
        fresh = all(p.grad is None for p in params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach()
                else:
                    p.grad.add_(g)
        # With nothing accumulated before, these norms are exactly those of the accumulated gradients.
        self._grad_norms = norms if fresh else None
        self.pending_grads += 1
        return self._loss_result(ForwardBackwardResult, "forward_backward", loss_fn, res, batch, t0, loss_value)

    @own_rng
    def forward(self, batch_data: Any, loss_fn: str, loss_kwargs: dict | None = None) -> ForwardResult:
        t0 = time.perf_counter()
        spec, kwargs, batch = self._prepare(batch_data, loss_fn, loss_kwargs)
        created = self._ensure_heads(spec)
        try:
            kwargs = self._reference(spec, kwargs)
            self.model.eval()
            with torch.no_grad():
                res = spec(self._policy(kwargs.get("reference_model")), batch, **kwargs)
        except BaseException:
            for kind in created:
                self._drop_head(kind)
            raise
        finally:
            self.model.train()
        return self._loss_result(ForwardResult, "forward", loss_fn, res, batch, t0)

    def _loss_result(self, cls, op, loss_fn, res, batch, t0, loss_value: float | None = None):
        n_ex, n_tok = batching.batch_size_and_tokens(batch)
        if loss_value is None:
            loss_value = float(res.loss.detach().item())
        result = cls(loss=loss_value, metrics=dict(res.metrics), warnings=list(res.warnings),
                     timing={"compute": time.perf_counter() - t0}, loss_fn=loss_fn, step=self.step,
                     num_examples=n_ex, num_tokens=n_tok)
        self._log(op, {"loss_fn": loss_fn, "loss": result.loss, "metrics": result.metrics,
                       "warnings": result.warnings, "num_examples": n_ex, "num_tokens": n_tok})
        return result

    def optim_step(self, learning_rate: float | None = None) -> OptimStepResult:
        t0 = time.perf_counter()
        if learning_rate is not None and (not isinstance(learning_rate, (int, float)) or isinstance(learning_rate, bool)
                                          or learning_rate < 0 or not math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate: expected None or a finite number >= 0, got {learning_rate!r}")
        if self.pending_grads == 0:
            raise ValueError("optim_step: expected gradients accumulated by forward_backward since the last step, "
                             "got none; the step and the schedule are unchanged")
        grads = [p.grad for _, p in self.trainable_parameters() if p.grad is not None]
        grad_norm = self._grad_norm(grads) if grads else 0.0
        clipped = False
        if self.config.max_grad_norm is not None and grads and grad_norm > self.config.max_grad_norm:
            self._scale_grads(grads, self.config.max_grad_norm / (grad_norm + 1e-6))
            clipped = True
        self._grad_norms = None  # the gradients may have changed: a retried step recomputes
        if learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = float(learning_rate)
        lr_used = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # also restores the scheduled rate after a one-step override
        self.step += 1
        self.pending_grads = 0
        result = OptimStepResult(grad_norm=grad_norm, learning_rate=lr_used, step=self.step, clipped=clipped,
                                 timing={"compute": time.perf_counter() - t0})
        self._log("optim_step", {"grad_norm": grad_norm, "learning_rate": lr_used, "clipped": clipped})
        result.checkpoint = self._auto_checkpoint()
        return result

    def _grad_norm(self, grads: list[torch.Tensor]) -> float:
        """L2 norm of the accumulated gradients (a hook: the sharded run reduces it over ranks)."""
        # Cached by a forward_backward that found no gradient accumulated: the norms of these gradients.
        norms = self._grad_norms if self._grad_norms is not None else _float32_norms(grads)
        return float(torch.linalg.vector_norm(torch.stack(list(norms))).item())

    def _scale_grads(self, grads: list[torch.Tensor], factor: float) -> None:
        torch._foreach_mul_(grads, factor)

    def _auto_checkpoint(self) -> str | None:
        """``checkpoint_every=N``: after every N-th step, save checkpoint ``latest``. The step was taken, so a failed
        save is logged (``checkpoint_failed``) and warned about, never raised."""
        every = self.config.checkpoint_every
        if not every or self.step % every:
            return None
        try:
            return self.save_state("latest").path
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"checkpoint_every: saving 'latest' after step {self.step} failed: {exc}", RuntimeWarning)
            self._log("checkpoint_failed", {"name": "latest", "error": f"{type(exc).__name__}: {exc}"})
            return None

    def info(self) -> dict[str, Any]:
        n_train = sum(p.numel() for _, p in self.trainable_parameters())
        n_total = sum(p.numel() for p in self.model.parameters())
        return {"run_id": self.run_id, "name": self.config.name, "base_model": self.config.base_model,
                "lora_r": self.config.lora_r, "step": self.step, "pending_grads": self.pending_grads,
                "heads": list(self.heads),
                "trainable_parameters": n_train, "total_parameters": n_total, "device": str(self.device),
                "run_dir": self.run_dir, "metrics_path": self.metrics.path, "created_at": self.created_at,
                "config": asdict(self.config)}

    def close(self) -> None:
        self.metrics.close()
