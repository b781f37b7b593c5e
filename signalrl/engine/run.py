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

import functools
import math
import os
import time
import warnings
from dataclasses import asdict
from typing import Any, Sequence

import torch

from . import batching, checkpoint, checkpoint_load, limits
from .config import HEADS, RunConfig, _lr_lambda
from .metrics import MetricsWriter
from .models import BUILTIN_MODELS, load_base_model, resolve_dtype
from .frozen_models import ReferenceCache
from .sampling import sample_tokens, to_sequences
from .types import (CheckpointResult, ForwardBackwardResult, ForwardResult, LogprobsResult, OptimStepResult,
                    SampleResult, ScoreResult)


def _float32_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms as float32 (one fused multi-tensor kernel per dtype; float64 gradients are reduced in
    float64 and then rounded, as ``_foreach_norm`` will not narrow them)."""
    if all(g.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in grads):
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    return [n.float() for n in torch._foreach_norm(grads, 2)]


def _own_rng(method):
    """Run ``method`` on the run's own torch RNG stream (CPU generator; on a CUDA run, that device's too)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        saved = torch.random.get_rng_state()
        cuda = self.device.type == "cuda"
        saved_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        torch.random.set_rng_state(self._rng_state)
        if cuda:
            if self._cuda_rng_state is None:
                torch.cuda.manual_seed(self.config.seed + 29)
            else:
                torch.cuda.set_rng_state(self._cuda_rng_state, self.device)
        ok = False
        try:
            result = method(self, *args, **kwargs)
            ok = True
            return result
        finally:
            if ok:  # a failed request leaves the run's stream where it was, as it leaves everything else
                self._rng_state = torch.random.get_rng_state()
                if cuda:
                    self._cuda_rng_state = torch.cuda.get_rng_state(self.device)
            torch.random.set_rng_state(saved)
            if cuda:
                torch.cuda.set_rng_state(saved_cuda, self.device)
    return wrapper


def _losses():
    import signalrl.losses as losses
    from signalrl.losses import model as loss_model

    return losses, loss_model


class Run:
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
    @_own_rng
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

    @_own_rng
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

    @_own_rng
    def sample(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 32, temperature: float = 1.0,
               num_samples: int = 1, seed: int | None = None) -> SampleResult:
        t0 = time.perf_counter()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise TypeError("prompts: expected a non-empty list of strings or of token-id lists, "
                            f"got {type(prompts).__name__}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected an int >= 1, got {max_tokens!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0 \
                or not math.isfinite(temperature):
            raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
        prompt_ids = [batching.encode_prompt(p, self.tokenizer, f"prompts[{i}]") for i, p in enumerate(prompts)]
        self._check_prompts(prompt_ids, max_tokens, num_samples)
        generator = self.sampling_generator
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        self.model.eval()
        try:
            raw = sample_tokens(self._sampling_model(), prompt_ids, max_tokens=max_tokens, temperature=float(temperature),
                                num_samples=num_samples, eos_token_id=self.tokenizer.eos_token_id,
                                pad_token_id=self.tokenizer.pad_token_id, generator=generator, device=self.device)
        finally:
            self.model.train()
        seqs = to_sequences(raw, prompt_ids, self.tokenizer.decode)
        return SampleResult(sequences=seqs, timing={"compute": time.perf_counter() - t0})

    def _sampling_model(self):
        """What sampling calls as the causal LM (a hook: the sharded run routes it through its FSDP2 root)."""
        return self.model

    def _check_prompts(self, prompt_ids: list[list[int]], max_tokens: int, num_samples: int) -> None:
        from signalrl.losses._values import model_limits

        vocab, positions = model_limits(self._base())
        for i, ids in enumerate(prompt_ids):
            bad = [t for t in ids if not 0 <= t < (vocab or 2**63)]
            if bad:
                raise ValueError(f"prompts[{i}]: expected token ids in [0, {vocab}) (the model's vocabulary), "
                                 f"got {bad[0]}")
            if positions is not None and len(ids) + max_tokens > positions:
                raise ValueError(f"max_tokens: expected prompt length + max_tokens <= {positions} (the model's "
                                 f"max_position_embeddings), got {len(ids)} + {max_tokens} for prompts[{i}]")
        longest = max(len(ids) for ids in prompt_ids) + max_tokens
        limits.check_request(self._base().config, self._element_size(), self.max_request_bytes,
                             [("prompts", len(prompt_ids) * num_samples, longest)], what="sample")

    def _sequences(self, batch_data: Any, what: str) -> dict[str, Any]:
        """A batch of plain sequences (``input_ids``/``attention_mask``), its values checked against the model."""
        batch = batching.prepare_batch(batch_data, self.tokenizer, loss_fn=None, device=self.device)
        if "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError(f"{what}: batch_data must give sequences (input_ids/attention_mask, texts, "
                             "or prompt/response pairs)")
        from signalrl.losses._values import check_values, model_limits
        from signalrl.losses.base import Field

        vocab, positions = model_limits(self._base())
        fields = (Field("input_ids", ("B", "T"), "int"), Field("attention_mask", ("B", "T"), "mask"))
        check_values(what, fields, batch, vocab_size=vocab, max_positions=positions)
        limits.check_request(self._base().config, self._element_size(), self.max_request_bytes,
                             limits.batch_sequences(batch), what=what)
        return batch

    def score(self, batch_data: Any) -> ScoreResult:
        """Scalar reward-head outputs for sequences (a reward-model run)."""
        if "reward" not in self.heads:
            raise ValueError("score: this run has no reward head (train it with loss_fn='reward_modeling' or "
                             "create it with reward_head=True)")
        batch = self._sequences(batch_data, "score")
        self.model.eval()
        try:
            with torch.no_grad():
                r = self._policy().sequence_rewards(batch["input_ids"], batch["attention_mask"])
        finally:
            self.model.train()
        return ScoreResult(rewards=[float(x) for x in r.float().tolist()])

    def compute_logprobs(self, batch_data: Any) -> LogprobsResult:
        batch = self._sequences(batch_data, "compute_logprobs")
        self.model.eval()
        try:
            with torch.no_grad():
                lp = self._policy().token_logprobs(batch["input_ids"], batch["attention_mask"])
        finally:
            self.model.train()
        return LogprobsResult(logprobs=(lp * batch["attention_mask"]).float().tolist())

    # ------------------------------------------------------------------ checkpoints
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

    @_own_rng
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

    @_own_rng
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
