"""Autoregressive sampling with a KV cache, returning per-token log-probs.

Prompts of equal token length are batched together (no padding, so positions and attention are exactly
those of an unpadded forward pass). The log-prob recorded for each sampled token is
``log_softmax(logits / temperature)[token]`` in float32: the distribution it was drawn from. At
temperature 1 this is the same number the losses compute for ``old_log_probs`` from a full forward pass
over prompt + response (up to float rounding between the cached and the full forward).
Temperature 0 means greedy decoding; the recorded log-prob is then that of the temperature-1 distribution.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Sequence

import torch

from .types import SampledSequence


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    params = inspect.signature(type(_base_model(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _next_logits(model, input_ids, cache, cache_kw):
    kwargs = {"input_ids": input_ids, "use_cache": True, "logits_to_keep": 1}
    if cache is not None:
        kwargs[cache_kw] = cache
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -1, :].float(), new_cache


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, max_tokens: int,
                  temperature: float, num_samples: int, eos_token_id: int | None, pad_token_id: int,
                  generator: torch.Generator | None, device: torch.device | str, max_batch_rows: int = 256
                  ) -> list[list[tuple[list[int], list[float], str]]]:
    """``out[i][j] = (tokens, logprobs, finish_reason)`` for sample ``j`` of prompt ``i``."""
    cache_kw = cache_kwarg(model)
    results: list[list] = [[None] * num_samples for _ in prompt_ids]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompt_ids):
        by_len[len(p)].append(i)
    rows_per_prompt = num_samples
    for length, idxs in sorted(by_len.items()):
        chunk = max(1, max_batch_rows // rows_per_prompt)
        for c in range(0, len(idxs), chunk):
            sub = idxs[c:c + chunk]
            prompts = torch.tensor([prompt_ids[i] for i in sub], dtype=torch.long, device=device)
            ids = prompts.repeat_interleave(num_samples, dim=0)  # [G*S, P]
            rows = ids.shape[0]
            tokens = torch.full((rows, max_tokens), pad_token_id, dtype=torch.long, device=device)
            logps = torch.zeros((rows, max_tokens), dtype=torch.float32, device=device)
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            lengths = torch.full((rows,), max_tokens, dtype=torch.long, device=device)
            logits, cache = _next_logits(model, ids, None, cache_kw)
            for t in range(max_tokens):
                if temperature == 0:
                    logp_all = torch.log_softmax(logits, dim=-1)
                    tok = logp_all.argmax(dim=-1)
                else:
                    logp_all = torch.log_softmax(logits / temperature, dim=-1)
                    tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
                lp = logp_all.gather(1, tok[:, None]).squeeze(1)
                tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
                tokens[:, t] = tok
                logps[:, t] = torch.where(done, torch.zeros_like(lp), lp)
                if eos_token_id is not None:
                    hit = (~done) & (tok == eos_token_id)
                    lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
                    done = done | hit
                if t + 1 == max_tokens or bool(done.all()):
                    break
                logits, cache = _next_logits(model, tok[:, None], cache, cache_kw)
            tokens_l, logps_l, lengths_l = tokens.tolist(), logps.tolist(), lengths.tolist()
            for r in range(rows):
                n = lengths_l[r]
                toks = tokens_l[r][:n]
                finished = eos_token_id is not None and len(toks) > 0 and toks[-1] == eos_token_id
                results[sub[r // num_samples]][r % num_samples] = (
                    toks, logps_l[r][:n], "stop" if finished else "length")
    return results


def to_sequences(raw, prompt_ids, decode) -> list[list[SampledSequence]]:
    return [[SampledSequence(tokens=toks, text=decode(toks), logprobs=lps, finish_reason=reason,
                             prompt_tokens=list(prompt_ids[i]))
             for toks, lps, reason in group] for i, group in enumerate(raw)]
