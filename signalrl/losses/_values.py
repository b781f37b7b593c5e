"""Checks on a batch's *values* (the shapes and dtypes are :func:`signalrl.losses.base.validate_batch`'s):
token ids inside the vocabulary, labels inside it or ``-100``, masks of 0 and 1, no empty dimension, sequences
no longer than the model's positions, floating values finite wherever they count (what a masked position holds
is never read), and log-probs ≤ 0 there too.

They run before the model, with one device→host transfer for the whole batch (a second one only to describe
a failure), so a bad batch raises a ``ValueError`` naming the key, what was expected and what came — never an
``IndexError`` from an embedding or a NaN loss several steps later.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

IGNORE_INDEX = -100
LOGPROB_SLACK = 1e-3  # a log-prob summed in low precision may round slightly above 0
# the mask that says where a per-token key counts, by the key's shape pattern (first present wins)
_COUNTING_MASKS = {("B", "T"): ("response_mask", "loss_mask"), ("B", "S", "L"): ("response_masks",)}


def model_limits(model) -> tuple[int | None, int | None]:
    """``(vocab_size, max_positions)`` of a Hugging Face model: the input embedding's rows and the longest
    sequence its position embeddings cover (None where the model does not say)."""
    vocab = None
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if isinstance(getattr(emb, "num_embeddings", None), int):
        vocab = emb.num_embeddings
    cfg = getattr(model, "config", None)
    if vocab is None and isinstance(getattr(cfg, "vocab_size", None), int):
        vocab = cfg.vocab_size
    positions = None
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) > 0:
            positions = getattr(cfg, name)
            break
    return vocab, positions


def _predicted(attention_mask: Tensor) -> Tensor:
    m = attention_mask.bool()
    out = torch.zeros_like(m)
    out[:, 1:] = m[:, 1:] & m[:, :-1]
    return out


def _counting_mask(key: str, pattern: tuple, data: dict[str, Tensor]) -> Tensor | None:
    """Where ``data[key]`` counts: the loss's response/loss mask of the same shape, else the predicted tokens."""
    predicted = _predicted(data["attention_mask"]) if pattern == ("B", "T") and "attention_mask" in data else None
    for mk in _COUNTING_MASKS.get(pattern, ()):
        if mk in data and data[mk].shape == data[key].shape:
            # the losses count a [B, T] response/loss mask only where a token is predicted
            return data[mk].bool() if predicted is None else data[mk].bool() & predicted
    return predicted


def check_values(loss_name: str, fields, data: dict[str, Tensor], *, vocab_size: int | None,
                 max_positions: int | None, min_tokens: int = 1) -> None:
    """Raise ``ValueError`` for the first key whose values break the rules in the module docstring."""
    for f in fields:
        t = data.get(f.key)
        if isinstance(t, Tensor) and t.numel() == 0:
            raise ValueError(f"{loss_name}: batch[{f.key!r}]: expected at least one element in every dimension "
                             f"(a non-empty batch), got shape {list(t.shape)}")
    _check_lengths(loss_name, data, max_positions, min_tokens)

    checks: list[tuple[str, str, Tensor, Callable[[], str]]] = []  # (key, expected, bad-mask, describe)
    for f in fields:
        t = data.get(f.key)
        if not isinstance(t, Tensor):
            continue
        if f.kind == "mask" and t.dtype != torch.bool:
            checks.append((f.key, "values in {0, 1}", (t != 0) & (t != 1), lambda t=t: _first_bad(t, (t != 0) & (t != 1))))
        elif f.kind == "int" and f.key.endswith("_ids") and vocab_size is not None:
            bad = (t < 0) | (t >= vocab_size)
            checks.append((f.key, f"token ids in [0, {vocab_size}) (the model's vocabulary)", bad,
                           lambda t=t, bad=bad: _first_bad(t, bad)))
        elif f.kind == "int" and f.key == "labels" and vocab_size is not None:
            bad = ((t < 0) | (t >= vocab_size)) & (t != IGNORE_INDEX)
            checks.append((f.key, f"token ids in [0, {vocab_size}) or {IGNORE_INDEX} (ignored)", bad,
                           lambda t=t, bad=bad: _first_bad(t, bad)))
        elif f.kind == "float":
            pattern = next((p for p in f.patterns() if len(p) == t.dim()), None)
            count = _counting_mask(f.key, pattern, data) if t.dim() > 1 else None
            logprob = f.key.endswith("log_probs")
            bad = ~torch.isfinite(t) | (t > LOGPROB_SLACK) if logprob else ~torch.isfinite(t)
            if count is not None:
                bad = bad & count
            expected = ("finite log-probabilities <= 0" if logprob else "finite values") + \
                (" where they count (garbage is allowed where the mask is 0)" if count is not None else "")
            checks.append((f.key, expected, bad, lambda t=t, bad=bad: _first_bad(t, bad)))
    if not checks:
        return
    flags = torch.stack([bad.any() for _, _, bad, _ in checks]).tolist()  # the one host sync
    for (key, expected, _, describe), failed in zip(checks, flags):
        if failed:
            raise ValueError(f"{loss_name}: batch[{key!r}]: expected {expected}, got {describe()}")


def _first_bad(t: Tensor, bad: Tensor) -> str:
    idx = bad.nonzero()[0].tolist()
    n = int(bad.sum())
    return f"{t[tuple(idx)].item()!r} at index {idx}" + (f" ({n} such entries)" if n > 1 else "")


def _check_lengths(loss_name: str, data: dict[str, Any], max_positions: int | None, min_tokens: int) -> None:
    lengths = [(k, data[k].shape[-1]) for k in ("input_ids", "chosen_input_ids", "rejected_input_ids")
               if isinstance(data.get(k), Tensor)]
    if isinstance(data.get("prompt_ids"), Tensor) and isinstance(data.get("response_ids"), Tensor):
        lengths.append(("prompt_ids + response_ids", data["prompt_ids"].shape[-1] + data["response_ids"].shape[-1]))
    for key, n in lengths:
        if n < min_tokens:
            raise ValueError(f"{loss_name}: batch[{key!r}]: expected sequences of at least {min_tokens} tokens "
                             f"(a token and the next one it predicts), got {n}")
        if max_positions is not None and n > max_positions:
            raise ValueError(f"{loss_name}: batch[{key!r}]: expected sequences of at most {max_positions} tokens "
                             f"(the model's max_position_embeddings), got {n}")
