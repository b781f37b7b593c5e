"""Turn ``batch_data`` into the tensor dictionary a loss expects.

Accepted forms:

1. A dict of tensors (the documented batch formats of :mod:`signalrl.losses`). Nested Python lists of
   numbers are converted (ints → int64, floats → float32); tensors are moved to the run's device.
   A dict whose values are lists with strings in them is read as a column-wise list of examples (form 2).
2. A list of examples (dicts), tokenized with the run's tokenizer, right-padded and masked:

   - sequences: ``text`` (a whole document: ``<bos>`` + text + ``<eos>``), ``input_ids``/``tokens`` (used as
     given), or ``prompt`` + ``response`` (alias ``completion``; strings or token lists). A string response
     gets ``<eos>`` appended; a token-list response (e.g. from ``sample``) is used as given. Gives
     ``input_ids``, ``attention_mask``, and, with a prompt, ``labels`` (-100 on prompt and padding) and
     ``response_mask`` (1 on response tokens).
   - preference pairs (``dpo``, ``reward_modeling``): ``chosen`` and ``rejected`` (+ optional ``prompt``),
     giving ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_*`` and, with a prompt,
     ``chosen_loss_mask``/``rejected_loss_mask`` (1 on response tokens).
   - groups (``grpo``): ``prompt`` + ``responses`` (S strings or token lists) + ``rewards`` (S numbers),
     optional ``old_log_probs`` (S per-token lists), giving ``prompt_ids [B, P]`` (left-padded, with
     ``prompt_attention_mask``), ``response_ids [B, S, L]``, ``response_masks``, ``rewards [B, S]``.
   - any other field: a number → ``[B]``; a per-token list of numbers → ``[B, T]`` aligned with
     ``input_ids``, given either for every token of the sequence or for the response tokens only (then
     placed on the response positions, 0 elsewhere). For the PPO losses a scalar ``rewards`` is placed
     on the last response token (a sequence-level reward).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .tokenizer import TokenizerAdapter

IGNORE_INDEX = -100
_SEQ_KEYS = ("text", "input_ids", "tokens", "prompt", "response", "completion", "prompt_tokens",
             "response_tokens")
_PPO_LOSSES = ("enhanced_ppo", "conservative_ppo")


def _is_int_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def encode_prompt(p: Any, tok: TokenizerAdapter, where: str) -> list[int]:
    """A prompt: a string (encoded with special tokens, i.e. with ``<bos>``) or a list of token ids."""
    if isinstance(p, str):
        return tok.encode(p, add_special_tokens=True)
    if isinstance(p, torch.Tensor):
        p = p.tolist()
    if _is_int_list(p) and len(p) > 0:
        return list(p)
    raise TypeError(f"{where}: expected a string or a non-empty list of token ids, got {type(p).__name__}")


def _encode_response(r: Any, tok: TokenizerAdapter, where: str) -> list[int]:
    if isinstance(r, str):
        ids = tok.encode(r, add_special_tokens=False)
        return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    if isinstance(r, torch.Tensor):
        r = r.tolist()
    if _is_int_list(r):
        return list(r)
    raise TypeError(f"{where}: expected a string or a list of token ids, got {type(r).__name__}")


def _sequence(ex: dict, tok: TokenizerAdapter, where: str) -> tuple[list[int], int | None]:
    """``(ids, response_start)``; ``response_start`` is None when the example has no prompt/response split."""
    prompt = ex.get("prompt", ex.get("prompt_tokens"))
    response = ex.get("response", ex.get("completion", ex.get("response_tokens")))
    if prompt is not None and response is not None:
        p = encode_prompt(prompt, tok, f"{where}.prompt")
        return p + _encode_response(response, tok, f"{where}.response"), len(p)
    if "text" in ex:
        if not isinstance(ex["text"], str):
            raise TypeError(f"{where}.text: expected a string, got {type(ex['text']).__name__}")
        ids = tok.encode(ex["text"], add_special_tokens=True)
        return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else []), None
    for key in ("input_ids", "tokens"):
        if key in ex:
            ids = ex[key].tolist() if isinstance(ex[key], torch.Tensor) else ex[key]
            if not _is_int_list(ids) or not ids:
                raise TypeError(f"{where}.{key}: expected a non-empty list of token ids")
            return list(ids), None
    raise ValueError(f"{where}: an example needs 'text', 'input_ids'/'tokens', 'prompt'+'response', "
                     f"'chosen'+'rejected' or 'prompt'+'responses'; got keys {sorted(ex)}")


def _pad(rows: Sequence[Sequence], value, dtype, length: int | None = None, left: bool = False) -> torch.Tensor:
    n = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), max(n, 1)), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            t = torch.as_tensor(list(r), dtype=dtype)
            if left:
                out[i, out.shape[1] - len(r):] = t
            else:
                out[i, :len(r)] = t
    return out


def _collate_sequences(examples: list[dict], tok: TokenizerAdapter, loss_fn: str | None) -> dict[str, torch.Tensor]:
    seqs, starts = [], []
    for i, ex in enumerate(examples):
        ids, start = _sequence(ex, tok, f"batch_data[{i}]")
        seqs.append(ids)
        starts.append(start)
    has_split = any(s is not None for s in starts)
    if has_split and not all(s is not None for s in starts):
        raise ValueError("batch_data: either every example or none has a prompt/response split")
    T = max(len(s) for s in seqs)
    batch: dict[str, torch.Tensor] = {
        "input_ids": _pad(seqs, tok.pad_token_id, torch.long, T),
        "attention_mask": _pad([[1] * len(s) for s in seqs], 0, torch.long, T),
    }
    if has_split:
        resp = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            resp[i, st:len(s)] = 1
        batch["response_mask"] = resp
        batch["labels"] = torch.where(resp.bool(), batch["input_ids"], torch.full_like(batch["input_ids"],
                                                                                        IGNORE_INDEX))
    for key in examples[0]:
        if key in _SEQ_KEYS:
            continue
        vals = [ex.get(key) for ex in examples]
        if any(v is None for v in vals):
            raise ValueError(f"batch_data: field {key!r} is missing in some examples")
        if all(_is_num(v) for v in vals):
            if key == "rewards" and loss_fn in _PPO_LOSSES:
                r = torch.zeros(len(seqs), T, dtype=torch.float32)
                for i, (s, v) in enumerate(zip(seqs, vals)):
                    r[i, len(s) - 1] = float(v)
                batch[key] = r
            else:
                batch[key] = torch.tensor(vals, dtype=torch.long if all(isinstance(v, int) for v in vals)
                                          and key.endswith(("_ids", "lengths", "length")) else torch.float32)
            continue
        rows = []
        for i, (v, s, st) in enumerate(zip(vals, seqs, starts)):
            v = v.tolist() if isinstance(v, torch.Tensor) else v
            if not isinstance(v, (list, tuple)) or not all(_is_num(x) for x in v):
                raise TypeError(f"batch_data[{i}].{key}: expected a number or a list of numbers, "
                                f"got {type(v).__name__}")
            if len(v) == len(s):
                rows.append([float(x) for x in v])
            elif st is not None and len(v) == len(s) - st:
                rows.append([0.0] * st + [float(x) for x in v])
            else:
                need = f"{len(s)} (every token)" + (f" or {len(s) - st} (response tokens)" if st is not None else "")
                raise ValueError(f"batch_data[{i}].{key}: expected {need} values, got {len(v)}")
        batch[key] = _pad(rows, 0.0, torch.float32, T)
    return batch


def _collate_pairs(examples: list[dict], tok: TokenizerAdapter) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, ex in enumerate(examples):
        missing = [k for k in ("chosen", "rejected") if k not in ex]
        if missing:
            raise ValueError(f"batch_data[{i}]: expected a preference pair with 'chosen' and 'rejected' "
                             f"(+ optional 'prompt'), got keys {sorted(ex)} (missing {missing})")
    for side in ("chosen", "rejected"):
        sub = []
        for ex in examples:
            d = {"response": ex[side]} if "prompt" in ex else {"text": ex[side]} if isinstance(ex[side], str) \
                else {"input_ids": ex[side]}
            if "prompt" in ex:
                d["prompt"] = ex["prompt"]
            sub.append(d)
        b = _collate_sequences(sub, tok, None)
        out[f"{side}_input_ids"] = b["input_ids"]
        out[f"{side}_attention_mask"] = b["attention_mask"]
        if "response_mask" in b:
            out[f"{side}_loss_mask"] = b["response_mask"]
    return out


def _collate_groups(examples: list[dict], tok: TokenizerAdapter) -> dict[str, torch.Tensor]:
    for i, ex in enumerate(examples):
        if "prompt" not in ex:
            raise ValueError(f"batch_data[{i}]: expected 'prompt' with 'responses' and 'rewards', got keys {sorted(ex)}")
        rs = ex.get("responses")
        if not isinstance(rs, (list, tuple)) or not rs:
            raise ValueError(f"batch_data[{i}].responses: expected a non-empty list of responses (strings or "
                             f"token-id lists), got {rs!r}")
    prompts = [encode_prompt(ex["prompt"], tok, f"batch_data[{i}].prompt") for i, ex in enumerate(examples)]
    S = len(examples[0]["responses"])
    resp, rewards, old = [], [], []
    for i, ex in enumerate(examples):
        rs = ex["responses"]
        if len(rs) != S:
            raise ValueError(f"batch_data[{i}].responses: expected {S} responses (as in example 0), got {len(rs)}")
        resp.append([_encode_response(r, tok, f"batch_data[{i}].responses[{j}]") for j, r in enumerate(rs)])
        rw = ex.get("rewards")
        if rw is None or len(rw) != S or not all(_is_num(x) for x in rw):
            raise ValueError(f"batch_data[{i}].rewards: expected {S} numbers, got {rw!r}")
        rewards.append([float(x) for x in rw])
        if "old_log_probs" in ex:
            old.append(ex["old_log_probs"])
    L = max(len(r) for group in resp for r in group)
    B = len(examples)
    response_ids = torch.full((B, S, L), tok.pad_token_id, dtype=torch.long)
    masks = torch.zeros((B, S, L), dtype=torch.long)
    for b in range(B):
        for s in range(S):
            r = resp[b][s]
            response_ids[b, s, :len(r)] = torch.tensor(r, dtype=torch.long)
            masks[b, s, :len(r)] = 1
    batch = {
        "prompt_ids": _pad(prompts, tok.pad_token_id, torch.long, left=True),
        "prompt_attention_mask": _pad([[1] * len(p) for p in prompts], 0, torch.long, left=True),
        "response_ids": response_ids,
        "response_masks": masks,
        "rewards": torch.tensor(rewards, dtype=torch.float32),
    }
    if old:
        if len(old) != B:
            raise ValueError("batch_data: 'old_log_probs' must be given for every example or none")
        olp = torch.zeros((B, S, L), dtype=torch.float32)
        for b in range(B):
            for s in range(S):
                v = list(old[b][s])
                if len(v) != len(resp[b][s]):
                    raise ValueError(f"batch_data[{b}].old_log_probs[{s}]: expected {len(resp[b][s])} values "
                                     f"(one per response token), got {len(v)}")
                olp[b, s, :len(v)] = torch.tensor(v, dtype=torch.float32)
        batch["old_log_probs"] = olp
    return batch


def _to_tensor(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        try:
            t = torch.tensor(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"batch_data[{key!r}]: could not make a tensor from the list ({exc}); "
                            "nested lists must be rectangular and numeric") from exc
        return t.float() if t.is_floating_point() else t
    return value


# Keys this module derives from examples; dropped when the loss's batch spec does not accept them.
DERIVED_KEYS = frozenset({"labels", "response_mask", "chosen_loss_mask", "rejected_loss_mask", "prompt_attention_mask"})


def prepare_batch(batch_data: Any, tok: TokenizerAdapter, *, loss_fn: str | None, device: torch.device,
                  accepted_keys: frozenset[str] | set[str] | None = None) -> dict[str, Any]:
    """See the module docstring. Returns tensors on ``device``. Derived keys (:data:`DERIVED_KEYS`) that
    are not in ``accepted_keys`` are left out (None keeps them all)."""
    if isinstance(batch_data, dict):
        if not batch_data:
            raise ValueError("batch_data: expected a non-empty dict or list of examples, got an empty dict")
        columns = [v for v in batch_data.values() if isinstance(v, (list, tuple))]
        if columns and any(isinstance(x, str) or isinstance(x, (list, tuple)) and x and isinstance(x[0], str)
                           for col in columns for x in col):
            n = len(columns[0])
            if any(not isinstance(v, (list, tuple)) or len(v) != n for v in batch_data.values()):
                raise ValueError("batch_data: a dict of columns needs lists of equal length for every key")
            batch_data = [{k: v[i] for k, v in batch_data.items()} for i in range(n)]
        else:
            return {k: (_to_tensor(k, v).to(device) if isinstance(_to_tensor(k, v), torch.Tensor) else v)
                    for k, v in batch_data.items()}
    if not isinstance(batch_data, (list, tuple)) or not batch_data:
        raise TypeError("batch_data: expected a dict of tensors or a non-empty list of example dicts, "
                        f"got {type(batch_data).__name__}")
    if not all(isinstance(ex, dict) for ex in batch_data):
        raise TypeError("batch_data: every example must be a dict")
    first = batch_data[0]
    if "chosen" in first or "rejected" in first:
        batch = _collate_pairs(list(batch_data), tok)
    elif "responses" in first:
        batch = _collate_groups(list(batch_data), tok)
    else:
        batch = _collate_sequences(list(batch_data), tok, loss_fn)
    return {k: v.to(device) for k, v in batch.items()
            if accepted_keys is None or k not in DERIVED_KEYS or k in accepted_keys}


def batch_size_and_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    for ids_key, mask_key in (("input_ids", "attention_mask"), ("chosen_input_ids", "chosen_attention_mask"),
                              ("response_ids", "response_masks")):
        if ids_key in batch and isinstance(batch[ids_key], torch.Tensor):
            mask = batch.get(mask_key)
            n_tok = int(mask.sum().item()) if isinstance(mask, torch.Tensor) else batch[ids_key].numel()
            if ids_key == "chosen_input_ids" and isinstance(batch.get("rejected_attention_mask"), torch.Tensor):
                n_tok += int(batch["rejected_attention_mask"].sum().item())
            return int(batch[ids_key].shape[0]), n_tok
    return 0, 0
