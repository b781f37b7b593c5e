"""What a run computes without training: sampling, reward-head scores and per-token log-probs (:class:`Sampling`,
a base of :class:`signalrl.engine.run.Run`; its methods use the run's model, tokenizer, heads and limits)."""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from . import batching, limits
from .rng import own_rng
from .sampling import sample_tokens, to_sequences
from .types import LogprobsResult, SampleResult, ScoreResult


class Sampling:
    @own_rng
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
